"""An adapter on disk: ``adapter.safetensors`` (weights) + ``adapter.json`` (everything else).

The JSON carries the configuration, the class list the adapter was trained on
(task classes then auxiliary classes, in logit order), the identity of the
model whose logits it expects, and the provenance of every phase that shaped
it, so later steps can refuse a mismatched combination instead of silently
producing nonsense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..method.adapter import AdapterConfig, TransMiterAdapter, clone_adapter, release_orthogonal
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
from .models import ModelIdentity

FORMAT = "transmiter-deploy/adapter"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["adapter"]
WEIGHTS = "adapter.safetensors"
STAGES = ("extracted", "transferred", "plus")


@dataclass
class AdapterArtifact:
    """An adapter with the facts needed to use it correctly."""

    adapter: TransMiterAdapter
    class_names: list[str]
    auxiliary_names: list[str]
    stage: str
    source_model: ModelIdentity
    target_model: ModelIdentity | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  # set when loaded from disk; None for weights not yet saved

    @property
    def model(self) -> ModelIdentity:
        """The model whose zero-shot logits this adapter takes as input."""
        return self.target_model if self.target_model is not None else self.source_model

    @property
    def all_class_names(self) -> list[str]:
        return self.class_names + self.auxiliary_names


def check_adapter_head(artifact: AdapterArtifact, head, what: str) -> None:
    """An adapter applies only to the head of its own model with its exact class list."""
    if head.model != artifact.model:
        raise InputError(
            f"{what} is for {head.model.describe()} but the adapter applies to {artifact.model.describe()}"
        )
    check_class_list(artifact, head, what)


def check_class_list(artifact: AdapterArtifact, head, what: str) -> None:
    if head.all_class_names != artifact.all_class_names:
        raise InputError(
            f"{what} class list ({len(head.class_names)} + {len(head.auxiliary_names)}) is not the adapter's "
            f"({len(artifact.class_names)} + {len(artifact.auxiliary_names)}, same order); build it with "
            "--classes-from the adapter"
        )


def save_adapter(artifact: AdapterArtifact, out_dir: Path) -> Path:
    """Write the adapter atomically; returns the directory."""
    release_orthogonal(artifact.adapter)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        # from CPU tensors whatever device trained the adapter: the file is the same either way
        state = {name: t.detach().cpu() for name, t in artifact.adapter.state_dict().items()}
        digest = save_tensors(staging / WEIGHTS, state)
        manifest = {
            "stage": artifact.stage,
            "config": artifact.adapter.config.to_dict(),
            "class_names": artifact.class_names,
            "auxiliary_names": artifact.auxiliary_names,
            "source_model": artifact.source_model.to_dict(),
            "target_model": artifact.target_model.to_dict() if artifact.target_model else None,
            "provenance": artifact.provenance,
            "files": {WEIGHTS: {"sha256": digest, "bytes": (staging / WEIGHTS).stat().st_size}},
        }
        write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, manifest)
    return out_dir


def load_adapter(path: Path) -> AdapterArtifact:
    """Load and verify an adapter directory (hash, keys, shapes).
    A writer replacing it meanwhile: the old one or the new one, read whole."""
    return read_consistently(path, lambda: _load_adapter(Path(path)))


def _load_adapter(path: Path) -> AdapterArtifact:
    path = Path(path)
    manifest = read_manifest(path / MANIFEST, FORMAT, FORMAT_VERSION, "adapter manifest")
    where = str(path / MANIFEST)
    require_keys(
        manifest,
        {
            "stage": str,
            "config": dict,
            "class_names": list,
            "auxiliary_names": list,
            "source_model": dict,
            "target_model": (dict, type(None)),
            "provenance": dict,
            "files": dict,
        },
        where,
    )
    if manifest["stage"] not in STAGES:
        raise IntegrityError(f"{where}: unknown stage '{manifest['stage']}'")
    require_string_lists(manifest, ("class_names", "auxiliary_names"), where)
    try:
        config = AdapterConfig(**manifest["config"])
    except TypeError as exc:
        raise IntegrityError(f"{where}: bad 'config': {exc}") from exc
    width = len(manifest["class_names"]) + len(manifest["auxiliary_names"])
    if config.num_task_classes != len(manifest["class_names"]) or config.logit_width != width:
        raise IntegrityError(
            f"{where}: config ({config.num_task_classes} task classes, width {config.logit_width}) "
            f"disagrees with the class lists ({len(manifest['class_names'])} + "
            f"{len(manifest['auxiliary_names'])})"
        )
    digest = recorded_sha256(manifest, WEIGHTS, where)
    state = load_tensors(path / WEIGHTS, digest, "adapter weights")
    adapter = TransMiterAdapter(config)
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise IntegrityError(f"{path / WEIGHTS}: weights do not fit the config: {' '.join(first[:3])}") from exc
    adapter.eval()
    return AdapterArtifact(
        adapter=adapter,
        class_names=list(manifest["class_names"]),
        auxiliary_names=list(manifest["auxiliary_names"]),
        stage=manifest["stage"],
        source_model=ModelIdentity.from_dict(manifest["source_model"], where),
        target_model=(
            ModelIdentity.from_dict(manifest["target_model"], where)
            if manifest["target_model"] is not None
            else None
        ),
        provenance=manifest["provenance"],
        weights_sha256=digest,
    )


__all__ = ["AdapterArtifact", "save_adapter", "load_adapter", "clone_adapter", "check_adapter_head", "check_class_list"]
