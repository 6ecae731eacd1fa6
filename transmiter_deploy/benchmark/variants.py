"""What the benchmark runs: for one target architecture, every way of serving it.

- ``backbone``: the target zero-shot (image tower + K-class head), the baseline;
- ``fused``: target + TransMiter folded into the head (the deployed graph);
- ``unfolded``: target + all C logits, then the adapter (what folding saves);
- ``eft:<source>``: EFT logit arithmetic, target + fine-tuned source - zero-shot source,
  three image towers per input (see :mod:`transmiter_deploy.method.eft`);
- ``head``: the folded head + adapter alone on image features, to isolate its cost.

Weights are random (open_clip architectures built with a seed, a synthetic head with
C rows and an adapter with small random MLP weights): latency and MACs do not depend
on weight values. Each variant is a list of parts that take the same input; a variant
with several parts (EFT) combines their outputs with :func:`eft_logits`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import demo  # noqa: F401  (registers the demo pair's architectures)
from ..method.adapter import AdapterConfig, TransMiterAdapter
from ..features.adapter_artifact import AdapterArtifact
from ..method.eft import eft_logits
from ..errors import InputError
from ..deploy.fusion import DeployedClassifier, FoldedHead, UnfoldedHead, ZeroShotTaskHead
from ..features.heads import ZeroShotHead
from ..features.models import LoadedModel, ModelIdentity, ModelSpec, load_model


VARIANT_NAMES = ("backbone", "fused", "unfolded", "eft", "head")  # "eft" stands for every eft:<source>;
# backbone@<precision> and fused@<precision> follow their fp32 variant's selection


@dataclass(frozen=True)
class Pair:
    """A source -> target transfer as the shipped recipes name them."""

    source: str
    target: str
    logit_width: int = 1024  # C (= latent D)
    classes: int = 100  # K


PAIRS = {
    "demo": Pair("TM-Demo-Source", "TM-Demo-Target", logit_width=128, classes=8),
    "vit-b-32_to_vit-b-16": Pair("ViT-B-32", "ViT-B-16"),
    "rn50_to_vit-b-16": Pair("RN50", "ViT-B-16"),
    "vit-b-16_to_vit-l-14": Pair("ViT-B-16", "ViT-L-14"),
}


@dataclass
class Part:
    """One graph: a module and the key its exported ONNX file is cached under; a reduced
    precision's part is the fp32 graph of ``base_key`` converted (graph runtimes only)."""

    module: nn.Module
    graph_key: str
    precision: str = "fp32"

    @property
    def base_key(self) -> str:
        return self.graph_key.split("@")[0]


@dataclass
class Variant:
    name: str
    takes: str  # "pixels" or "features"
    parts: list[Part]

    def combine(self, outputs: list):
        return outputs[0] if len(outputs) == 1 else eft_logits(*outputs)

    @property
    def precision(self) -> str:
        return self.parts[0].precision


@dataclass
class TargetGroup:
    """Every variant of one target, timed together so their ratios come from one loop."""

    target: str
    pairs: list[str]
    image_size: tuple[int, int]
    feature_dim: int
    logit_width: int
    classes: int
    variants: dict[str, Variant] = field(default_factory=dict)

    def example(self, takes: str, batch: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, 3, *self.image_size) if takes == "pixels" else (batch, self.feature_dim)
        example = torch.randn(shape, generator=generator)
        return example if takes == "pixels" else torch.nn.functional.normalize(example, dim=-1)

    def modules(self) -> list[nn.Module]:
        return [part.module for variant in self.variants.values() for part in variant.parts]


def synthetic_head(model: LoadedModel, rows: int, classes: int, seed: int) -> ZeroShotHead:
    """A head shaped like a real one: unit rows times CLIP's logit scale of 100."""
    generator = torch.Generator().manual_seed(seed)
    d = model.feature_dim
    weight = torch.nn.functional.normalize(torch.randn(rows, d, generator=generator), dim=1) * 100.0
    names = [f"class {i}" for i in range(rows)]
    return ZeroShotHead(weight, names[:classes], names[classes:], model.identity, ("{}",), 100.0)


def synthetic_head_and_adapter(model: LoadedModel, width: int, classes: int,
                               seed: int = 0) -> tuple[ZeroShotHead, AdapterArtifact]:
    """A C-row head and a transferred adapter (D = C) with non-zero MLP weights, so the
    adapter is not the identity it is at initialisation."""
    head = synthetic_head(model, width, classes, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=classes, logit_width=width, latent_dim=width), seed=seed)
    with torch.no_grad():
        for parameter in adapter.blocks.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    artifact = AdapterArtifact(adapter, head.class_names, head.auxiliary_names, "transferred",
                               ModelIdentity("synthetic-source"), model.identity)
    return head, artifact


def _classifier(model: LoadedModel, classes: int, seed: int) -> nn.Module:
    return DeployedClassifier(model.model.visual, ZeroShotTaskHead(synthetic_head(model, classes, classes, seed)))


def build_group(target: str, pair_names: list[str], seed: int = 0, precisions: tuple[str, ...] = ("fp32",)) -> TargetGroup:
    """All variants of ``target`` for the named pairs (which must all have that target); each
    precision other than fp32 adds ``backbone@<precision>`` and ``fused@<precision>``."""
    pairs = [PAIRS[name] for name in pair_names]
    if not pairs or any(pair.target != target for pair in pairs):
        raise InputError(f"pairs {pair_names} do not all have target {target}")
    shapes = {(pair.logit_width, pair.classes) for pair in pairs}
    if len(shapes) != 1:
        raise InputError(f"pairs {pair_names} disagree on the head shape: {sorted(shapes)}")
    width, classes = shapes.pop()
    model = load_model(ModelSpec(target, init_seed=seed))
    head, artifact = synthetic_head_and_adapter(model, width, classes, seed)
    size = tuple(model.preprocess_config["image_size"])
    group = TargetGroup(target, list(pair_names), size, model.feature_dim, width, classes)
    visual = model.model.visual
    tag = f"{target}-C{width}-K{classes}-s{seed}"
    backbone = Part(_classifier(model, classes, seed), f"{target}-K{classes}-s{seed}-backbone")
    group.variants["backbone"] = Variant("backbone", "pixels", [backbone])
    group.variants["fused"] = Variant("fused", "pixels", [Part(
        DeployedClassifier(visual, FoldedHead(head, artifact)), f"{tag}-fused")])
    group.variants["unfolded"] = Variant("unfolded", "pixels", [Part(
        DeployedClassifier(visual, UnfoldedHead(head, artifact)), f"{tag}-unfolded")])
    for pair in pairs:
        source_model = load_model(ModelSpec(pair.source, init_seed=seed))
        if tuple(source_model.preprocess_config["image_size"]) != size:
            raise InputError(f"EFT needs one input size: {pair.source} takes "
                             f"{source_model.preprocess_config['image_size']}, {target} takes {list(size)}")
        # The zero-shot and fine-tuned source towers differ only in weight values, which do not
        # change speed: the zero-shot one is a separate copy of the fine-tuned one (its own
        # memory, as a real second model has), and ONNX Runtime loads the one graph file into
        # two sessions. The key matches a target's backbone graph of the same seed (ViT-B-16
        # is both), so that graph is exported once.
        key = f"{pair.source}-K{classes}-s{seed}-backbone"
        finetuned = _classifier(source_model, classes, seed)
        group.variants[f"eft:{pair.source}"] = Variant(
            f"eft:{pair.source}", "pixels", [backbone, Part(finetuned, key), Part(copy.deepcopy(finetuned), key)])
    group.variants["head"] = Variant("head", "features", [Part(FoldedHead(head, artifact), f"{tag}-head")])
    for precision in precisions:
        if precision == "fp32":
            continue
        for name in ("backbone", "fused"):
            (part,) = group.variants[name].parts
            group.variants[f"{name}@{precision}"] = Variant(f"{name}@{precision}", "pixels", [
                Part(part.module, f"{part.graph_key}@{precision}", precision)])
    return group


def targets_of(pair_names: list[str]) -> dict[str, list[str]]:
    """Pair names grouped by target architecture, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in pair_names:
        if name not in PAIRS:
            raise InputError(f"unknown benchmark pair '{name}' (known: {', '.join(PAIRS)})")
        groups.setdefault(PAIRS[name].target, []).append(name)
    return groups
