"""Zero-shot heads: one row per class, built from a model's own text tower.

Row c is the L2-normalised mean of the normalised text embeddings of class c
over the prompt templates, times the model's ``exp(logit_scale)``; logits are
``features @ weight.T + logit_bias``, the bias being SigLIP's learnt scalar (0 for CLIP's
families; docs/method.md says why the adapter is blind to it). Rows 0..K-1 are the task classes (in the dataset's
order), rows K..C-1 the auxiliary classes (see :mod:`.vocabulary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..artifacts import (
    MANIFESTS,
    atomic_directory,
    load_tensors,
    read_consistently,
    read_manifest,
    recorded_sha256,
    require_keys,
    require_string_lists,
    save_tensors,
    write_manifest,
)
from ..errors import InputError, IntegrityError
from .models import LoadedModel, ModelIdentity, stand_in_description
from .templates import validate_templates

FORMAT = "transmiter-deploy/head"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["head"]
WEIGHTS = "head.safetensors"


@dataclass
class ZeroShotHead:
    weight: torch.Tensor  # (C, d) float32, logit scale included
    class_names: list[str]
    auxiliary_names: list[str]
    model: ModelIdentity
    templates: tuple[str, ...]
    logit_scale: float
    weights_sha256: str | None = None  # set when loaded from disk, for provenance
    logit_bias: float = 0.0  # added to every logit (SigLIP); 0 for CLIP's families
    stand_in_tokenizer: str | None = None  # set when the text was tokenized by a stand-in

    @property
    def num_task_classes(self) -> int:
        return len(self.class_names)

    @property
    def all_class_names(self) -> list[str]:
        return self.class_names + self.auxiliary_names

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.weight.shape[1]:
            raise InputError(
                f"features have width {features.shape[-1]} but the head of {self.model.describe()} "
                f"expects {self.weight.shape[1]}"
            )
        return features.float() @ self.weight.T + self.logit_bias


def check_unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{what}: class names must be non-empty strings, got {name!r}")
        if name in seen:
            raise InputError(f"{what}: duplicate class name '{name}'")
        seen.add(name)


@torch.no_grad()
def build_head(
    model: LoadedModel,
    class_names: list[str],
    auxiliary_names: list[str],
    templates: tuple[str, ...],
    batch_size: int = 256,
    progress: bool = True,
) -> ZeroShotHead:
    names = list(class_names) + list(auxiliary_names)
    check_unique(names, "head classes")
    validate_templates(templates, "head templates")
    texts = [template.format(name) for name in names for template in templates]
    chunks = []
    for start in tqdm(
        range(0, len(texts), batch_size),
        desc=f"text tower {model.identity.name}",
        unit="batch",
        disable=not progress,
    ):
        chunks.append(model.encode_texts(texts[start : start + batch_size]).cpu())
    embeddings = torch.cat(chunks).view(len(names), len(templates), -1)
    weight = F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1) * model.logit_scale
    return ZeroShotHead(
        weight=weight.float().contiguous(),
        class_names=list(class_names),
        auxiliary_names=list(auxiliary_names),
        model=model.identity,
        templates=tuple(templates),
        logit_scale=model.logit_scale,
        logit_bias=model.logit_bias,
        stand_in_tokenizer=stand_in_description(model.tokenizer),
    )


def save_head(head: ZeroShotHead, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        digest = save_tensors(staging / WEIGHTS, {"weight": head.weight})
        write_manifest(
            staging / MANIFEST,
            FORMAT,
            FORMAT_VERSION,
            {
                "model": head.model.to_dict(),
                "class_names": head.class_names,
                "auxiliary_names": head.auxiliary_names,
                "templates": list(head.templates),
                "logit_scale": head.logit_scale,
                "logit_bias": head.logit_bias,
                **({"stand_in_tokenizer": head.stand_in_tokenizer} if head.stand_in_tokenizer else {}),
                "shape": list(head.weight.shape),
                "files": {WEIGHTS: {"sha256": digest}},
            },
        )
    return out_dir


def load_head(path: Path) -> ZeroShotHead:
    """Read and verify a head.
    A writer replacing it meanwhile: the old one or the new one, read whole."""
    return read_consistently(path, lambda: _load_head(Path(path)))


def _load_head(path: Path) -> ZeroShotHead:
    path = Path(path)
    manifest = read_manifest(path / MANIFEST, FORMAT, FORMAT_VERSION, "head manifest")
    where = str(path / MANIFEST)
    require_keys(
        manifest,
        {"model": dict, "class_names": list, "auxiliary_names": list, "templates": list,
         "logit_scale": (int, float), "files": dict},
        where,
    )
    require_string_lists(manifest, ("class_names", "auxiliary_names", "templates"), where)
    if isinstance(manifest["logit_scale"], bool) or not math.isfinite(manifest["logit_scale"]):
        raise IntegrityError(f"{where}: logit_scale must be a finite number, got {manifest['logit_scale']!r}")
    bias = manifest.get("logit_bias", 0.0)  # heads written before SigLIP support have none: 0
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
        raise IntegrityError(f"{where}: logit_bias must be a finite number, got {bias!r}")
    stand_in = manifest.get("stand_in_tokenizer")
    if stand_in is not None and not isinstance(stand_in, str):
        raise IntegrityError(f"{where}: stand_in_tokenizer must be a string, got {stand_in!r}")
    digest = recorded_sha256(manifest, WEIGHTS, where)
    tensors = load_tensors(path / WEIGHTS, digest, "head weights")
    weight = tensors.get("weight")
    width = len(manifest["class_names"]) + len(manifest["auxiliary_names"])
    if weight is None or weight.ndim != 2 or weight.shape[0] != width:
        raise IntegrityError(f"{path / WEIGHTS}: expected a 'weight' tensor with {width} rows")
    return ZeroShotHead(
        weight=weight.float(),
        class_names=list(manifest["class_names"]),
        auxiliary_names=list(manifest["auxiliary_names"]),
        model=ModelIdentity.from_dict(manifest["model"], where),
        templates=tuple(manifest["templates"]),
        logit_scale=float(manifest["logit_scale"]),
        weights_sha256=digest,
        logit_bias=float(bias),
        stand_in_tokenizer=stand_in,
    )
