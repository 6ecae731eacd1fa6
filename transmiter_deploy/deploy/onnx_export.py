"""Export the deployed classifier to ONNX (fp32 and each reduced precision) and verify it.

Artifacts written into one directory, atomically:

- ``model.onnx``: ``pixel_values`` float32 [batch, 3, H, W] -> ``logits`` float32 [batch, K];
- ``head.onnx``: ``image_features`` float32 [batch, d] -> ``logits`` (for apps with their own backbone);
- ``model<suffix>.onnx`` / ``head<suffix>.onnx`` per reduced precision of the registry
  (``model_fp16.onnx``: mixed precision for TensorRT's strongly typed networks, fp16 weights
  and GEMMs, fp32 for the feature normalisation, the statistics and the de-standardisation,
  fp32 I/O), each made from the verified fp32 graph by its converter (``deploy/precisions/``);
- ``head.safetensors``: the folded head as plain tensors (:mod:`.head_weights`) for runtimes that
  have the features and no ONNX interpreter (the C++ head backend in ``cpp/``);
- ``manifest.json``: the I/O contract, preprocessing, class names, identities, hashes, and the
  precision of every file (what runners read; never the file name);
- ``parity.json``: every comparison and the MAC table.

A graph whose tensors pass the external-data threshold (default just under protobuf's 2 GiB
limit; ``ExportSettings.external_data_threshold``, ``TRANSMITER_EXTERNAL_DATA_THRESHOLD``) is
written with ONNX external data: ``model.onnx`` holds the structure and ``model.onnx.data``
the tensors, both listed and hashed in the manifest (``runtimes/onnx_files.py``: ``save_graph``,
``graph_entries``).

The graphs are traced by deploy/trace.py; the dynamic batch axis is verified by running batches
of two sizes. Every graph is run through the registry's verification runtime (deploy/parity.py);
reduced precisions are converted and checked by deploy/precision_edits.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..artifacts import atomic_directory, write_json, write_manifest
from ..errors import InputError, VerificationError
from ..host import release_freed_memory
from ..features.adapter_artifact import AdapterArtifact, check_adapter_head
from ..features.heads import ZeroShotHead
from ..features.models import LoadedModel
from ..runtimes.compare import compare_outputs
from ..runtimes.onnx_files import (graph_entries, graph_structure, io_contract, probes_batched,
                                   resolve_external_data_threshold, save_graph)
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION, Precision, default_precisions, precision
from .calibration import Calibration
from .export_format import FORMAT, FORMAT_VERSION, LINEAGE, MANIFEST
from .export_memory import check_export_memory
from .fusion import FP32_NODES, DeployedClassifier, FoldedHead, UnfoldedHead
from .gate import GateImages
from .graph_cost import count_macs
from .head_weights import HEAD_FILE, HEAD_FORMAT, HEAD_FORMAT_VERSION, head_logits_numpy, write_head_safetensors
from .parity import FP32_LOGIT_ATOL, Checks, References, graph_runner, run_graph
from .precision_edits import add_precision, convert_precision
from .reparameterise import for_inference
from .trace import DEFAULT_OPSET, export_graph, to_onnx


@dataclass(frozen=True)
class ExportSettings:
    opset: int = DEFAULT_OPSET
    softmax: bool = False
    precisions: tuple[str, ...] = default_precisions()  # fp32 is the reference of every other
    sigma_mode: str = "auto"
    # Images the fp16 converter runs through the fp32 model to find out-of-range nodes (in
    # groups of tensors: its memory does not grow with them, its time does). The statistic
    # nodes are kept fp32 by name regardless.
    calibration_images: int = 1
    # Graphs whose tensors pass this many bytes are written with external data (save_graph);
    # None: the TRANSMITER_EXTERNAL_DATA_THRESHOLD environment variable, else just under 2 GiB.
    external_data_threshold: int | None = None
    # what an upgrade made this export from (deploy/export_format.py), recorded in the manifest
    lineage: dict | None = None

    def __post_init__(self) -> None:
        resolve_external_data_threshold(self.external_data_threshold)  # refuses a bad value, naming it
        for name in self.precisions:
            precision(name)  # refuses an unknown name, listing the known ones
        if REFERENCE_PRECISION not in self.precisions:
            raise InputError(f"precisions must include {REFERENCE_PRECISION} (the reference of every other)")

    def reduced(self) -> list[Precision]:
        """Converted with the fp32 graphs, in one directory."""
        return [PRECISIONS[name] for name in self.precisions
                if not PRECISIONS[name].reference and not PRECISIONS[name].needs_calibration]

    def calibrated(self) -> list[Precision]:
        """Added to the verified export afterwards (:func:`add_precision`), each behind its gate."""
        return [PRECISIONS[name] for name in self.precisions if PRECISIONS[name].needs_calibration]


@dataclass
class ExportReport:
    out_dir: Path
    parity: dict[str, Any]
    macs: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    references: References | None = None

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.parity["checks"].values() if check.get("required"))


def parity_pixels(model: LoadedModel, images: Path | None, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Preprocessed images for parity and fp16 calibration.

    From a dataset when given (the first ``count`` images), otherwise seeded
    synthetic images (random shapes on noise) run through the model's own
    preprocessing, so pixel statistics are realistic even without data.
    """
    from PIL import Image, ImageDraw

    from ..features.datasets import decode_image, open_dataset

    if images is not None:
        records = open_dataset(images).records[:count]
        pictures = [decode_image(record.path)[0] for record in records]
    else:
        rng = np.random.default_rng(seed)
        pictures = []
        for _ in range(count):
            canvas = Image.fromarray(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(canvas)
            for _ in range(3):
                x0, y0 = (int(v) for v in rng.integers(0, 60, size=2))
                size = int(rng.integers(10, 36))
                draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
            pictures.append(canvas)
    if len(pictures) < 2:
        raise InputError(f"parity needs at least 2 images; {images} has {len(pictures)}")
    return torch.stack([model.preprocess(picture) for picture in pictures])


@dataclass
class _Modules:
    """The fused classifier, the deployed head, the unfolded reference, and what PyTorch computed."""

    fused: DeployedClassifier
    folded: FoldedHead
    unfolded: UnfoldedHead
    features: torch.Tensor
    fused_outputs: np.ndarray
    head_logits: np.ndarray
    unfolded_outputs: np.ndarray
    reparameterised: int  # modules of the image tower folded into their inference form before tracing


def _modules(model: LoadedModel, head: ZeroShotHead, artifact: AdapterArtifact, pixels: torch.Tensor,
             settings: ExportSettings) -> _Modules:
    folded = FoldedHead(head, artifact, settings.sigma_mode)
    unfolded = UnfoldedHead(head, artifact)
    visual, reparameterised = for_inference(model.model.visual)
    fused = DeployedClassifier(visual, folded, softmax=settings.softmax)
    with torch.no_grad():
        # The backbone runs once, as trained (not reparameterised); the PyTorch references are
        # composed from its features independently of DeployedClassifier, which the export traces.
        features = torch.nn.functional.normalize(model.model.visual(pixels).float(), dim=-1)
        head_logits, unfolded_logits = folded(features), unfolded(features)
        if settings.softmax:
            fused_outputs, unfolded_logits = head_logits.softmax(dim=-1), unfolded_logits.softmax(dim=-1)
        else:
            fused_outputs = head_logits
    return _Modules(fused, folded, unfolded, features, fused_outputs.numpy(), head_logits.numpy(),
                    unfolded_logits.numpy(), reparameterised)


def _verify_fp32(staging: Path, parts: _Modules, pixels: torch.Tensor, checks: Checks) -> None:
    """ONNX Runtime (two batch sizes) and the head file's own reading against PyTorch."""
    atol = FP32_LOGIT_ATOL
    with graph_runner(staging / "model.onnx") as runner:
        ort_fp32 = runner.infer(pixels.numpy())
        ort_fp32_odd = runner.infer(pixels[:3].numpy())  # a second batch size: the axis is really dynamic
    ort_head = run_graph(staging / "head.onnx", parts.features.numpy())
    # head.safetensors read back and computed in float64 numpy: the file alone defines the head
    tensors_head = head_logits_numpy(staging / HEAD_FILE, parts.features.numpy())
    result = compare_outputs(parts.unfolded_outputs, parts.fused_outputs)
    checks.add("torch_folded_vs_unfolded", result, result["max_abs"] <= atol, True, f"max_abs <= {atol}")
    result = compare_outputs(parts.fused_outputs, ort_fp32)
    checks.add("onnx_fp32_vs_torch", result, result["max_abs"] <= atol and result["top1_agreement"] == 1.0,
               True, f"max_abs <= {atol}, top-1 agreement 100%")
    result = compare_outputs(parts.fused_outputs[:3], ort_fp32_odd)
    checks.add("onnx_fp32_dynamic_batch", result, result["max_abs"] <= atol, True, "batch 3 = batch N rows")
    result = compare_outputs(parts.head_logits, ort_head)
    checks.add("head_onnx_vs_torch", result, result["max_abs"] <= atol, True, f"max_abs <= {atol}")
    result = compare_outputs(parts.head_logits, tensors_head.astype(np.float32))
    checks.add("head_safetensors_vs_torch", result, result["max_abs"] <= atol, True, f"max_abs <= {atol}")


def _macs(model_onnx: onnx.ModelProto, head_onnx: onnx.ModelProto, unfolded_onnx: onnx.ModelProto) -> dict[str, Any]:
    """MACs of the graphs as written: pass them read back with :func:`graph_structure`, so a graph
    past 2 GiB is counted from its structure (shape inference cannot serialise it whole)."""
    macs = {"batch": 1, "model": count_macs(model_onnx), "head_folded": count_macs(head_onnx)["total"],
            "head_unfolded": count_macs(unfolded_onnx)["total"]}
    macs["overhead_percent"] = 100.0 * macs["model"].get("head+adapter", 0) / max(macs["model"].get("backbone", 1), 1)
    return macs


def _write_manifest(staging: Path, files: dict[str, str], model: LoadedModel, head: ZeroShotHead,
                    artifact: AdapterArtifact, parts: _Modules, settings: ExportSettings, output: str) -> None:
    """``files``: name -> precision name, in writing order."""
    contract = {name: io_contract(onnx.load(staging / name, load_external_data=False))
                for name in files if name.endswith(".onnx")}
    contract[HEAD_FILE] = {"tensor_format": HEAD_FORMAT, "tensor_format_version": HEAD_FORMAT_VERSION,
                           "input": "image features [batch, feature_dim], raw or L2-normalised "
                                    "(the runtime L2-normalises them, as model.onnx does)",
                           "outputs": [{"name": "logits", "dtype": "float32",
                                        "shape": ["batch", len(artifact.class_names)]}]}
    write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, {
        "files": {key: entry for name, kind in files.items()
                  for key, entry in graph_entries(staging, name, PRECISIONS[kind], contract[name]).items()},
        "output": output,
        "class_names": artifact.class_names,
        "preprocess": model.preprocess_config,
        "feature_dim": int(parts.features.shape[1]),
        "image_tower": {"reparameterised_modules": parts.reparameterised},
        "opset": settings.opset,
        "fp32_nodes_in_fp16_graphs": list(FP32_NODES),
        "source_model": artifact.source_model.to_dict(),
        "target_model": model.identity.to_dict(),
        "adapter": {"stage": artifact.stage, "config": artifact.adapter.config.to_dict(),
                    "sigma_mode": parts.folded.sigma_mode, "provenance": artifact.provenance},
        "head_sha256": head.weights_sha256,
        "adapter_sha256": artifact.weights_sha256,
        **({"stand_in_tokenizer": head.stand_in_tokenizer} if head.stand_in_tokenizer else {}),
        **({LINEAGE: settings.lineage} if settings.lineage else {}),
    })


def check_tower_memory(model: LoadedModel, settings: ExportSettings) -> None:
    """Refuse (exit 3) exporting ``model``'s image tower in ``settings``' precisions on a machine that
    cannot hold it (export_memory.py), before anything is traced."""
    tower = model.model.visual
    weight_bytes = sum(t.numel() * 4 for t in (*tower.parameters(), *tower.buffers()) if t.is_floating_point())
    check_export_memory(weight_bytes, settings.precisions, f"the image tower of {model.identity.describe()}",
                        external_data=weight_bytes > resolve_external_data_threshold(settings.external_data_threshold))


def export_deployment(
    model: LoadedModel,
    head: ZeroShotHead,
    artifact: AdapterArtifact,
    out_dir: Path,
    pixels: torch.Tensor,
    settings: ExportSettings = ExportSettings(),
    log=print,
    calibration: Calibration | None = None,
) -> ExportReport:
    """Fuse, export, verify; ``pixels`` are preprocessed images used for parity (and the fp16
    calibration). Calibrated precisions (int8) are converted from ``calibration`` and added
    afterwards by :func:`add_precision`, gated on agreement over ``pixels``."""
    if head.model != model.identity:
        raise InputError(f"the head is for {head.model.describe()} but the model named is {model.identity.describe()}")
    check_adapter_head(artifact, head, "target head")
    if pixels.ndim != 4 or pixels.shape[0] < 2:
        raise InputError("parity needs a batch of at least 2 preprocessed images")
    if settings.calibrated() and calibration is None:
        raise InputError(f"{settings.calibrated()[0].name} needs calibration images (--calibration-data)")
    check_tower_memory(model, settings)
    timings: dict[str, float] = {}
    parts = _modules(model, head, artifact, pixels, settings)
    output = "probabilities" if settings.softmax else "logits"
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        start = time.perf_counter()
        with probes_batched():
            # written as traced, its weights never in memory beside the tower's; counted from the file (_macs)
            export_graph(parts.fused, pixels[:2], "pixel_values", output, settings.opset,
                         f"image tower {model.identity.name}", staging / "model.onnx", settings.external_data_threshold)
            release_freed_memory()
            head_onnx = to_onnx(parts.folded, parts.features[:2], "image_features", "logits", settings.opset,
                                "folded head", staging)
            save_graph(head_onnx, staging / "head.onnx", settings.external_data_threshold)
        unfolded_onnx = to_onnx(parts.unfolded, parts.features[:2], "image_features", "logits", settings.opset,
                                "unfolded head", staging)
        timings["export_fp32_s"] = time.perf_counter() - start
        log(f"exported model.onnx and head.onnx (opset {settings.opset}) in {timings['export_fp32_s']:.1f} s")

        start = time.perf_counter()
        write_head_safetensors(parts.folded, staging / HEAD_FILE)
        checks = Checks()
        _verify_fp32(staging, parts, pixels, checks)
        release_freed_memory()  # the parity sessions' weights, before a converter loads them again
        files = {"model.onnx": REFERENCE_PRECISION, "head.onnx": REFERENCE_PRECISION}
        converter_inputs = {"model": {"pixel_values": pixels[: settings.calibration_images].numpy()},
                            "head": {"image_features": parts.features.numpy()}}
        for target in settings.reduced():
            converted = convert_precision(staging, target, converter_inputs, pixels.numpy(), parts.fused_outputs,
                                 parts.features.numpy(), parts.head_logits, checks,
                                 external_data_threshold=settings.external_data_threshold)
            files.update({name: target.name for name in converted})
        timings["verify_s"] = time.perf_counter() - start

        macs = _macs(graph_structure(staging / "model.onnx"), head_onnx, unfolded_onnx)
        parity = {"samples": int(pixels.shape[0]), "output": output, "checks": dict(checks), "macs": macs}
        write_json(staging / "parity.json", parity)
        files[HEAD_FILE] = REFERENCE_PRECISION
        _write_manifest(staging, files, model, head, artifact, parts, settings, output)
        report = ExportReport(out_dir, parity, macs, timings, References(pixels.numpy(), parts.fused_outputs))
        if not report.passed:
            failed = ", ".join(name for name, c in checks.items() if c["required"] and not c["passed"])
            log(format_report(report))
            raise VerificationError(f"export verification failed ({failed}); nothing was written to {out_dir}")
    for target in settings.calibrated():
        gate = GateImages(pixels.numpy(), None, description="parity images (agreement only: no labels)")
        add_precision(out_dir, target, calibration_inputs(model, calibration.pixels), report.references,
                      calibration.record, gate, log, settings.external_data_threshold)
    return report


def calibration_inputs(model: LoadedModel, pixels: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """What each graph's converter calibrates on: the images, and their L2-normalised features."""
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.model.visual(pixels).float(), dim=-1)
    return {"model": {"pixel_values": pixels.numpy()}, "head": {"image_features": features.numpy()}}


def format_report(report: ExportReport) -> str:
    """The parity and cost tables as plain text."""
    lines = [f"{'check':32} {'max abs':>10} {'/max ref':>10} {'/sample std':>11} {'top-1':>7}  result"]
    for name, c in report.parity["checks"].items():
        verdict = ("pass" if c["passed"] else "FAIL") + ("" if c["required"] else " (reported)")
        lines.append(f"{name:32} {c['max_abs']:10.2e} {c['max_abs_over_max_reference']:10.2e} "
                     f"{c['max_abs_over_sample_std']:11.2e} {c['top1_agreement']:7.2%}  {verdict}")
    macs = report.macs
    lines.append("")
    lines.append(f"MACs at batch 1: backbone {macs['model'].get('backbone', 0):,}, head+adapter "
                 f"{macs['model'].get('head+adapter', 0):,} ({macs['overhead_percent']:.4f}% of the backbone); "
                 f"folded head {macs['head_folded']:,} vs unfolded {macs['head_unfolded']:,}")
    return "\n".join(lines)
