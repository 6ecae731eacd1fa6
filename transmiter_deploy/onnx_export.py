"""Export the deployed classifier to ONNX (fp32 and mixed fp16) and verify it.

Artifacts written into one directory, atomically:

- ``model.onnx``: ``pixel_values`` float32 [batch, 3, H, W] -> ``logits`` float32 [batch, K];
- ``head.onnx``: ``image_features`` float32 [batch, d] -> ``logits`` (for apps with their own backbone);
- ``model_fp16.onnx`` / ``head_fp16.onnx``: the same graphs in mixed precision for TensorRT's
  strongly typed networks: fp16 weights and GEMMs, fp32 for the feature normalisation, the
  statistics (mean, sigma, the division by sigma) and the de-standardisation, fp32 I/O.
  Converted by NVIDIA ModelOpt AutoCast with those nodes named explicitly;
- ``head.safetensors``: the folded head as plain tensors (:mod:`.head_weights`) for runtimes that
  have the features and no ONNX interpreter (the C++ head backend in ``cpp/``);
- ``manifest.json``: the I/O contract, preprocessing, class names, identities, hashes;
- ``parity.json``: every comparison and the MAC table.

The TorchScript exporter (``dynamo=False``) is used: it needs no extra
packages and its dynamic batch axis is verified by running batches of two
sizes through ONNX Runtime.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .adapter_artifact import AdapterArtifact, check_adapter_head
from .artifacts import atomic_directory, sha256_file, write_json, write_manifest
from .errors import DependencyError, InputError, VerificationError
from .fusion import DeployedClassifier, FoldedHead, UnfoldedHead
from .graph_cost import count_macs
from .head_weights import HEAD_FILE, HEAD_FORMAT, HEAD_FORMAT_VERSION, head_logits_numpy, write_head_safetensors
from .heads import ZeroShotHead
from .models import LoadedModel
from .parity import compare_outputs

FORMAT = "transmiter-deploy/onnx-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_OPSET = 17
# Nodes ModelOpt AutoCast must keep in fp32 (regexes, matched from the start of the name).
FP32_NODES = (r".*/normalise/.*", r".*/stats/.*", r".*/destandardise/.*")
FP32_LOGIT_ATOL = 1e-4
FP16_TOP1_MIN = 0.995


@dataclass(frozen=True)
class ExportSettings:
    opset: int = DEFAULT_OPSET
    softmax: bool = False
    fp16: bool = True
    sigma_mode: str = "auto"
    # Images AutoCast runs through the fp32 model to find out-of-range nodes. Its
    # reference run keeps every intermediate tensor: ViT-L-14 with 4 images
    # needed over 24 GB, and even with 1 image the whole fp16 export of ViT-L-14
    # peaked at 22.4 GB RSS. The statistic nodes are kept fp32 by name regardless.
    calibration_images: int = 1


@dataclass
class ExportReport:
    out_dir: Path
    parity: dict[str, Any]
    macs: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.parity["checks"].values() if check.get("required"))


def to_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
            opset: int, what: str) -> onnx.ModelProto:
    """Trace to ONNX with a dynamic batch axis, simplify with onnxslim, check fully."""
    import onnxslim

    buffer = io.BytesIO()
    try:
        # Grad mode on: under no_grad, nn.MultiheadAttention takes a fused fast
        # path (aten::_native_multi_head_attention) that has no ONNX symbolic.
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean "cannot trace this"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot export {what} to ONNX: {first}") from exc
    model = onnxslim.slim(onnx.load_from_string(buffer.getvalue()))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"exported {what} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return model


def to_mixed_fp16(fp32_path: Path, calibration: dict[str, np.ndarray],
                  fp32_nodes: tuple[str, ...] = FP32_NODES) -> onnx.ModelProto:
    """ModelOpt AutoCast with our statistic nodes forced to fp32 and fp32 graph I/O.

    AutoCast alone keeps a node fp32 only if the calibration data drive it past
    |512|; deployment inputs can be larger than any calibration set, so the
    statistic nodes are named explicitly.
    """
    try:
        from modelopt.onnx.autocast import configure_logging, convert_to_mixed_precision
    except ImportError as exc:
        raise DependencyError(
            "the fp16 export needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]==0.47.*' "
            "(or export with --no-fp16)"
        ) from exc
    import onnxruntime

    # AutoCast logs every node it visits at INFO (its own logger; keep warnings)
    # and lowers ONNX Runtime's log level process-wide (restored afterwards).
    configure_logging(logging.WARNING)
    try:
        model = convert_to_mixed_precision(
            str(fp32_path), low_precision_type="fp16", keep_io_types=True,
            nodes_to_exclude=list(fp32_nodes), calibration_data=calibration, providers=["cpu"],
        )
    finally:
        onnxruntime.set_default_logger_severity(2)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(path: Path, reduced_precision: bool = False, provider: str = "CPUExecutionProvider",
                threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime session (CPU by default); the graph optimiser is off for fp16 graphs.

    ORT's CPU optimiser has crashed on AutoCast fp16 CLIP graphs (DESIGN.md section 4);
    without it the same graphs run correctly. ``threads`` sets the intra-op pool (one
    sequential inter-op thread); None leaves ONNX Runtime's default (one per core).
    ``spinning=False`` stops idle pool threads from busy-waiting after a run: needed
    when several sessions take turns in one process, where one session's spinning
    threads would steal the cores the next one runs on.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if reduced_precision:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=[provider])


def _run(session, array: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: array})[0]


def _io_contract(model: onnx.ModelProto) -> dict[str, list[dict]]:
    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def parity_pixels(model: LoadedModel, images: Path | None, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Preprocessed images for parity and fp16 calibration.

    From a dataset when given (the first ``count`` images), otherwise seeded
    synthetic images (random shapes on noise) run through the model's own
    preprocessing, so pixel statistics are realistic even without data.
    """
    from PIL import Image, ImageDraw

    from .datasets import decode_image, open_dataset

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


def export_deployment(
    model: LoadedModel,
    head: ZeroShotHead,
    artifact: AdapterArtifact,
    out_dir: Path,
    pixels: torch.Tensor,
    settings: ExportSettings = ExportSettings(),
    log=print,
) -> ExportReport:
    """Fuse, export, verify; ``pixels`` are preprocessed images used for parity and calibration."""
    if head.model != model.identity:
        raise InputError(f"the head is for {head.model.describe()} but the model named is {model.identity.describe()}")
    check_adapter_head(artifact, head, "target head")
    if pixels.ndim != 4 or pixels.shape[0] < 2:
        raise InputError("parity needs a batch of at least 2 preprocessed images")
    timings: dict[str, float] = {}
    folded = FoldedHead(head, artifact, settings.sigma_mode)
    unfolded = UnfoldedHead(head, artifact)
    fused = DeployedClassifier(model.model.visual, folded, softmax=settings.softmax)
    output = "probabilities" if settings.softmax else "logits"
    with torch.no_grad():
        # The backbone runs once; the PyTorch references are composed from its
        # features independently of DeployedClassifier, which the export traces.
        features = torch.nn.functional.normalize(model.model.visual(pixels).float(), dim=-1)
        head_logits, unfolded_logits = folded(features), unfolded(features)
        if settings.softmax:
            head_outputs, unfolded_logits = head_logits.softmax(dim=-1), unfolded_logits.softmax(dim=-1)
        else:
            head_outputs = head_logits
        torch_fused, torch_unfolded, torch_head = head_outputs.numpy(), unfolded_logits.numpy(), head_logits.numpy()

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        start = time.perf_counter()
        model_onnx = to_onnx(fused, pixels[:2], "pixel_values", output, settings.opset, f"image tower {model.identity.name}")
        onnx.save(model_onnx, staging / "model.onnx")
        head_onnx = to_onnx(folded, features[:2], "image_features", "logits", settings.opset, "folded head")
        onnx.save(head_onnx, staging / "head.onnx")
        unfolded_onnx = to_onnx(unfolded, features[:2], "image_features", "logits", settings.opset, "unfolded head")
        timings["export_fp32_s"] = time.perf_counter() - start
        log(f"exported model.onnx and head.onnx (opset {settings.opset}) in {timings['export_fp32_s']:.1f} s")

        start = time.perf_counter()
        session = ort_session(staging / "model.onnx")
        ort_fp32 = _run(session, pixels.numpy())
        ort_fp32_odd = _run(session, pixels[:3].numpy())  # a second batch size: the axis is really dynamic
        ort_head = _run(ort_session(staging / "head.onnx"), features.numpy())
        write_head_safetensors(folded, staging / HEAD_FILE)
        tensors_head = head_logits_numpy(staging / HEAD_FILE, features.numpy())
        checks: dict[str, dict] = {}

        def check(name: str, result: dict, passed: bool, required: bool, criterion: str) -> None:
            checks[name] = {**result, "passed": bool(passed), "required": required, "criterion": criterion}

        result = compare_outputs(torch_unfolded, torch_fused)
        check("torch_folded_vs_unfolded", result, result["max_abs"] <= FP32_LOGIT_ATOL, True, f"max_abs <= {FP32_LOGIT_ATOL}")
        result = compare_outputs(torch_fused, ort_fp32)
        check("onnx_fp32_vs_torch", result, result["max_abs"] <= FP32_LOGIT_ATOL and result["top1_agreement"] == 1.0,
              True, f"max_abs <= {FP32_LOGIT_ATOL}, top-1 agreement 100%")
        result = compare_outputs(torch_fused[:3], ort_fp32_odd)
        check("onnx_fp32_dynamic_batch", result, result["max_abs"] <= FP32_LOGIT_ATOL, True, "batch 3 = batch N rows")
        result = compare_outputs(torch_head, ort_head)
        check("head_onnx_vs_torch", result, result["max_abs"] <= FP32_LOGIT_ATOL, True, f"max_abs <= {FP32_LOGIT_ATOL}")
        # head.safetensors read back and computed in float64 numpy: the file alone defines the head
        result = compare_outputs(torch_head, tensors_head.astype(np.float32))
        check("head_safetensors_vs_torch", result, result["max_abs"] <= FP32_LOGIT_ATOL, True,
              f"max_abs <= {FP32_LOGIT_ATOL}")

        files = ["model.onnx", "head.onnx"]
        if settings.fp16:
            calibration = {"pixel_values": pixels[: settings.calibration_images].numpy()}
            onnx.save(to_mixed_fp16(staging / "model.onnx", calibration), staging / "model_fp16.onnx")
            onnx.save(to_mixed_fp16(staging / "head.onnx", {"image_features": features.numpy()}), staging / "head_fp16.onnx")
            files += ["model_fp16.onnx", "head_fp16.onnx"]
            ort_fp16 = _run(ort_session(staging / "model_fp16.onnx", reduced_precision=True), pixels.numpy())
            result = compare_outputs(torch_fused, ort_fp16)
            check("onnx_fp16_vs_torch_fp32", result, result["finite"] and result["top1_agreement"] >= FP16_TOP1_MIN,
                  False, f"finite, top-1 agreement >= {FP16_TOP1_MIN:.1%} (ONNX Runtime CPU)")
            result = compare_outputs(torch_head, _run(ort_session(staging / "head_fp16.onnx", True), features.numpy()))
            check("head_fp16_vs_torch_fp32", result, result["finite"], True, "finite outputs")
        timings["verify_s"] = time.perf_counter() - start

        macs = {
            "batch": 1,
            "model": count_macs(model_onnx),
            "head_folded": count_macs(head_onnx)["total"],
            "head_unfolded": count_macs(unfolded_onnx)["total"],
        }
        macs["overhead_percent"] = 100.0 * macs["model"].get("head+adapter", 0) / max(macs["model"].get("backbone", 1), 1)
        parity = {"samples": int(pixels.shape[0]), "output": output, "checks": checks, "macs": macs}
        write_json(staging / "parity.json", parity)
        config = artifact.adapter.config
        contract = {name: _io_contract(onnx.load(staging / name, load_external_data=False)) for name in files}
        contract[HEAD_FILE] = {"tensor_format": HEAD_FORMAT, "tensor_format_version": HEAD_FORMAT_VERSION,
                               "input": "image features [batch, feature_dim], raw or L2-normalised "
                                        "(the runtime L2-normalises them, as model.onnx does)",
                               "outputs": [{"name": "logits", "dtype": "float32",
                                            "shape": ["batch", len(artifact.class_names)]}]}
        files.append(HEAD_FILE)
        write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, {
            "files": {name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size,
                             "precision": "mixed-fp16" if "fp16" in name else "fp32", **contract[name]}
                      for name in files},
            "output": output,
            "class_names": artifact.class_names,
            "preprocess": model.preprocess_config,
            "feature_dim": int(features.shape[1]),
            "opset": settings.opset,
            "fp32_nodes_in_fp16_graphs": list(FP32_NODES),
            "source_model": artifact.source_model.to_dict(),
            "target_model": model.identity.to_dict(),
            "adapter": {"stage": artifact.stage, "config": config.to_dict(), "sigma_mode": folded.sigma_mode,
                        "provenance": artifact.provenance},
            "head_sha256": head.weights_sha256,
            "adapter_sha256": artifact.weights_sha256,
        })
        report = ExportReport(out_dir, parity, macs, timings)
        if not report.passed:
            failed = ", ".join(name for name, c in checks.items() if c["required"] and not c["passed"])
            log(format_report(report))
            raise VerificationError(f"export verification failed ({failed}); nothing was written to {out_dir}")
    return report


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
