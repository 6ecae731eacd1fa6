"""The bank sweep's fp32 graphs: a random-weight backbone and N synthetic folded heads.

One backbone graph (a random-weight open_clip image tower, :class:`~..deploy.bank.Backbone`) and
max(N) synthetic folded TransMiter heads (C = D, K classes per task; random MLP weights, a seed
per task), exported like the deployed ones (:func:`~..deploy.trace.to_onnx`) and cached under
``<work>/bank-graphs`` with a record of the code and library versions that made them. This
module is one of the sources of that record (``BANK_SOURCES``): changing it re-exports them.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from onnx import numpy_helper

from .. import demo  # noqa: F401  (registers the demo architectures, for small sweeps and tests)
from ..artifacts import library_versions, sha256_file, write_json
from ..deploy.bank import FEATURES, Backbone
from ..deploy.fusion import FoldedHead
from ..deploy.trace import DEFAULT_OPSET, to_onnx
from ..features.adapter_artifact import AdapterArtifact
from ..features.heads import ZeroShotHead
from ..features.models import ModelIdentity, ModelSpec, load_model
from ..method.adapter import AdapterConfig, TransMiterAdapter
from .graphs import cached_record, code_digest, save_cached_graph

# what shapes the cached graphs: these modules (package-relative), this one included
BANK_SOURCES = ("deploy/fusion.py", "method/adapter.py", "deploy/trace.py", "deploy/bank.py",
                "benchmark/bank_graphs.py")
GRAPHS_DIR = "bank-graphs"  # under the work folder


def synthetic_folded_head(feature_dim: int, width: int, classes: int, seed: int,
                          identity: ModelIdentity | None = None, latent_dim: int | None = None,
                          mlp_scale: float = 0.02, source: ModelIdentity | None = None) -> FoldedHead:
    """A folded TransMiter head for ``feature_dim``-dim features: a CLIP-like C-row head (unit
    rows x 100) and an adapter (D = C) whose MLP weights are random (fc2 is zero at init, so
    the adapter would be the identity). Like :func:`.variants.synthetic_head_and_adapter`, for
    any d without a model."""
    identity = identity or ModelIdentity(f"synthetic-d{feature_dim}", init_seed=seed)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator), dim=1) * 100.0
    names = [f"class {i}" for i in range(width)]
    head = ZeroShotHead(weight, names[:classes], names[classes:], identity, ("{}",), 100.0)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=classes, logit_width=width,
                                              latent_dim=latent_dim or width), seed=seed)
    with torch.no_grad():
        for parameter in adapter.blocks.parameters():
            parameter.add_(mlp_scale * torch.randn(parameter.shape, generator=generator))
    artifact = AdapterArtifact(adapter, head.class_names, head.auxiliary_names, "transferred",
                               source or ModelIdentity("synthetic-source"), identity)
    return FoldedHead(head, artifact)


def head_graph(feature_dim: int, width: int, classes: int, seed: int, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    folded = synthetic_folded_head(feature_dim, width, classes, seed)
    example = torch.nn.functional.normalize(torch.randn(2, feature_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return to_onnx(folded, example, FEATURES, "logits", opset, f"synthetic folded head (seed {seed})")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer as stored (packed int4/int8 blobs count as their bytes)."""
    return int(sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer))


def cached_graph(folder: Path, key: str, make: Callable[[], onnx.ModelProto], log) -> onnx.ModelProto:
    """``make()`` saved as ``<folder>/<key>.onnx``, reused while the code and libraries that made
    it are unchanged (the record beside it) and its sha256 matches."""
    path, record_path = folder / f"{key}.onnx", folder / f"{key}.json"
    versions = library_versions()
    expected = {"key": key, "code_sha256": code_digest(BANK_SOURCES),
                **{name: versions.get(name) for name in ("torch", "onnx", "onnxslim", "open_clip_torch")}}
    if cached_record(path, record_path, expected) is not None:
        return onnx.load(path)
    start = time.perf_counter()
    model = make()
    folder.mkdir(parents=True, exist_ok=True)
    data = save_cached_graph(model, path)
    write_json(record_path, {**expected, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                             **({"external_data": data} if data else {})})
    log(f"exported {key} in {time.perf_counter() - start:.1f} s")
    return model


@dataclass
class BankGraphs:
    backbone: onnx.ModelProto
    heads: list[tuple[str, onnx.ModelProto]]  # (task name, fp32 head graph), task i of seed + i
    feature_dim: int
    image_size: tuple[int, int]
    identity: dict


def build_graphs(settings, work_dir: Path, log: Callable[[str], None] = print) -> BankGraphs:
    """The backbone graph and max(N) head graphs of ``settings`` (a ``bank.BankSettings``),
    cached under ``<work>/bank-graphs``."""
    model = load_model(ModelSpec(settings.model, init_seed=settings.seed))
    d = model.feature_dim
    size = tuple(int(v) for v in model.preprocess_config["image_size"])
    folder = Path(work_dir) / GRAPHS_DIR
    backbone_module = Backbone(model.model.visual)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(settings.seed))
    backbone = cached_graph(folder, f"{settings.model}-s{settings.seed}-backbone-o{settings.opset}",
                            lambda: to_onnx(backbone_module, pixels, "pixel_values", FEATURES, settings.opset,
                                            f"image tower {settings.model}"), log)
    del backbone_module, model
    gc.collect()
    heads = []
    for i in range(max(settings.tasks)):
        seed = settings.seed + i
        key = f"head-d{d}-C{settings.width}-K{settings.classes}-s{seed}-o{settings.opset}"
        heads.append((f"task{i:02d}", cached_graph(folder, key, lambda s=seed: head_graph(
            d, settings.width, settings.classes, s, settings.opset), log)))
    return BankGraphs(backbone, heads, d, size, {"name": settings.model, "init_seed": settings.seed})
