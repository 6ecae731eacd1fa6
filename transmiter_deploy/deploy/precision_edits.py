"""A precision's graphs converted, added to a verified export or taken out of it, atomically.

:func:`convert_graph` runs a registry precision's converter on a fp32 graph (the statistic
nodes kept fp32); :func:`convert_precision` converts an export's model and head graphs and
checks each against its fp32 reference; :func:`add_precision` adds a calibrated precision
(int8) to a verified export behind its accuracy gate, keeping its most sensitive quantised
nodes in fp32 when the gate fails (deploy/qdq_fallback.py); :func:`remove_precision` takes a
precision's graphs out. The export is rewritten into a new directory that replaces it whole,
so a failure leaves it as it was.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from ..artifacts import atomic_directory, read_json, read_manifest, write_json, write_manifest
from ..errors import InputError
from ..host import release_freed_memory
from ..runtimes.base import GraphFile, GraphInMemory
from ..runtimes.compare import compare_outputs, within_tolerance
from ..runtimes.onnx_files import (PROTOBUF_LIMIT, check_qdq_scales, external_data_locations, graph_entries,
                                   graph_structure, io_contract, is_external_data, link_or_copy, probes_batched,
                                   save_graph, stored_bytes)
from ..runtimes.registry import Precision, resolve
from . import qdq_fallback
from .export_format import FORMAT, FORMAT_VERSION, GRAPHS, MANIFEST
from .fusion import FP32_NODES
from .gate import GateFailed, GateImages, accuracy_gate
from .parity import Checks, References, graph_runner, run_graph, tolerance_criterion


def convert_graph(directory: Path, stem: str, target: Precision, inputs: dict[str, np.ndarray],
                  external_data_threshold: int | None = None) -> str:
    """``directory/<stem>.onnx`` converted to ``target`` by its registry converter (the
    statistic nodes kept fp32), saved beside it (external data by ``external_data_threshold``,
    whatever the fp32 graph had): by its ``file_converter`` where it has one (the converted graph
    never in memory whole), else saved from the converter's graph; returns the new file's name."""
    try:
        if target.file_converter is not None:
            resolve(target.file_converter)(directory / f"{stem}.onnx", directory / target.graph_name(stem), inputs,
                                           FP32_NODES, external_data_threshold)
            return target.graph_name(stem)
        convert: Callable = resolve(target.converter)
        converted = convert(directory / f"{stem}.onnx", inputs, FP32_NODES)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # a converter that writes a graph onnx refuses: an operator pattern of this architecture the
        # conversion does not handle yet (one line, exit 2, not the library's traceback)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the {target.name} conversion of {stem}.onnx makes an invalid graph, an operator "
                         f"pattern of this architecture it does not handle yet: {first}") from exc
    if target.qdq:
        check_qdq_scales(converted, f"{target.graph_name(stem)} as converted")
    save_graph(converted, directory / target.graph_name(stem), external_data_threshold)
    del converted
    release_freed_memory()
    return target.graph_name(stem)


def convert_precision(staging: Path, target: Precision, calibration: dict[str, dict[str, np.ndarray]],
             pixels: np.ndarray, model_reference: np.ndarray, features: np.ndarray, head_reference: np.ndarray,
             checks: Checks, head_reference_name: str = "torch", external_data_threshold: int | None = None) -> list[str]:
    """``target``'s model and head graphs from the fp32 ones in ``staging``, each checked against
    its fp32 reference outputs (``calibration``: per graph stem, the converter's input arrays)."""
    with probes_batched():
        files = [convert_graph(staging, stem, target, calibration[stem], external_data_threshold) for stem in GRAPHS]
    criterion = tolerance_criterion(target)
    result = compare_outputs(model_reference, run_graph(GraphFile(staging / target.graph_name("model"), target.name),
                                                        pixels))
    checks.add(f"onnx_{target.name}_vs_torch_fp32", result, within_tolerance(result, target.name),
               target.gates_export, criterion)
    if target.qdq and not _holds_quantised_nodes(staging / target.graph_name("head")):
        files.remove(_drop_graph(staging, target.graph_name("head")))
        return files
    result = compare_outputs(head_reference, run_graph(GraphFile(staging / target.graph_name("head"), target.name),
                                                       features))
    checks.add(f"head_{target.name}_vs_{head_reference_name}_fp32", result, result["finite"], True, "finite outputs")
    return files


def _holds_quantised_nodes(path: Path) -> bool:
    """Whether a Q/DQ graph computes anything in int8. ModelOpt 0.47 selects none of the folded
    head's GEMMs, even when they are named in ``nodes_to_quantize`` (measured on the demo head), so
    the head's "int8" graph is its fp32 graph: not an artifact to ship under an int8 name."""
    return bool(qdq_fallback.quantised_nodes(onnx.load(path, load_external_data=False)))


def _drop_graph(staging: Path, name: str) -> str:
    """Delete a converted graph and its external data files from ``staging``; returns its name."""
    for location in external_data_locations(graph_structure(staging / name)):
        (staging / location).unlink(missing_ok=True)
    (staging / name).unlink()
    return name


@dataclass
class Rewrite:
    """What a rewrite's block fills: the new directory, and the manifest body and parity report
    written into it when the block ends."""

    staging: Path
    body: dict[str, Any]  # the manifest without its format tag, versions and date
    parity: dict[str, Any]


@contextmanager
def rewritten(export_dir: Path, target: Precision, manifest_format: tuple[str, int] = (FORMAT, FORMAT_VERSION)
              ) -> Iterator[Rewrite]:
    """A new version of a verified export (or of another directory with a manifest and a
    ``parity.json``: ``manifest_format``, e.g. a bank's backbone export) without ``target``'s files,
    checks, gate, calibration record and fp32-node record, replacing the old one atomically when
    the block ends without error."""
    manifest_name, version = manifest_format
    manifest = read_manifest(export_dir / MANIFEST, manifest_name, version, "export manifest")
    parity = read_json(export_dir / "parity.json", "parity report")
    body = {key: value for key, value in manifest.items() if key not in ("format", "format_version", "versions", "created")}
    body["files"] = {name: entry for name, entry in manifest["files"].items()
                     if entry.get("precision") != target.manifest_name}
    body.get("calibration", {}).pop(target.name, None)
    body.get("fp32_nodes_kept", {}).pop(target.name, None)
    parity["checks"] = {name: check for name, check in parity["checks"].items() if f"_{target.name}_vs_" not in name}
    parity.get("gates", {}).pop(target.name, None)
    with atomic_directory(export_dir, MANIFEST) as staging:
        for name in [*body["files"], "parity.json"]:
            link_or_copy(export_dir / name, staging / name, copy=is_external_data(body["files"].get(name)))
        rewrite = Rewrite(staging, body, parity)
        yield rewrite
        write_json(staging / "parity.json", rewrite.parity)
        write_manifest(staging / MANIFEST, manifest_name, version, rewrite.body)


def add_precision(export_dir: Path, target: Precision, calibration: dict[str, dict[str, np.ndarray]],
                  references: References, calibration_record: dict, gate: GateImages | None = None,
                  log=print, external_data_threshold: int | None = None, fallback: bool = True) -> dict | None:
    """Convert the fp32 graphs of a verified export to ``target`` and add them to it, atomically:
    checked against the PyTorch references, then gated on ``gate``'s images (``fallback``: a Q/DQ
    graph that fails keeps its most sensitive nodes in fp32 until it passes). Returns the gate's
    table; a failed check or gate raises (GateFailed carries the table) and leaves the export
    as it was."""
    export_dir, start = Path(export_dir), time.perf_counter()
    with rewritten(export_dir, target) as rewrite:
        staging, checks = rewrite.staging, Checks(rewrite.parity["checks"])
        features = calibration["head"]["image_features"]
        head_reference = run_graph(staging / "head.onnx", features)
        files = convert_precision(staging, target, calibration, references.pixels, references.outputs, features,
                         head_reference, checks, head_reference_name="onnx",
                         external_data_threshold=external_data_threshold)
        record = None
        if gate is not None:
            reference = run_graph(staging / "model.onnx", gate.pixels)
            candidate = run_graph(GraphFile(staging / target.graph_name("model"), target.name), gate.pixels)
            record = accuracy_gate(reference, candidate, target, gate)
            if not record["passed"] and target.qdq and fallback:
                record = _keep_sensitive_nodes_fp32(staging, target, calibration["model"], gate, reference, record,
                                                    references, checks, external_data_threshold, log)
        _raise_if_failed(target, checks, record, export_dir)
        rewrite.parity["checks"] = dict(checks)
        rewrite.parity.setdefault("gates", {})[target.name] = record
        if record is not None and record.get("fallback", {}).get("passed"):
            rewrite.body.setdefault("fp32_nodes_kept", {})[target.name] = record["fallback"]["kept"]
        for name in files:
            rewrite.body["files"].update(graph_entries(staging, name, target, io_contract(graph_structure(staging / name))))
        rewrite.body.setdefault("calibration", {})[target.name] = calibration_record
    log(f"added {', '.join(files)} to {export_dir} in {time.perf_counter() - start:.1f} s")
    return record


def _keep_sensitive_nodes_fp32(staging: Path, target: Precision, calibration: dict[str, np.ndarray],
                               gate: GateImages, gate_reference: np.ndarray, record: dict, references: References,
                               checks: Checks, external_data_threshold: int | None, log) -> dict:
    """``target``'s graph failed its gate: keep its most sensitive quantised nodes in fp32, most
    sensitive first, until the gate holds (deploy/qdq_fallback.py: ranked on the calibration
    images, bounded tries). Returns the gate's table with a ``fallback`` record (every try); on
    success the graph in ``staging`` is replaced and its parity check redone."""
    path = staging / target.graph_name("model")
    if stored_bytes(graph_structure(path)) > PROTOBUF_LIMIT - (64 << 20):
        record["fallback"] = {"passed": False, "kept": [], "tries": [],
                              "reason": "not tried: the graph is too large to rewrite in memory"}
        return record
    pixels = next(iter(calibration.values()))[: qdq_fallback.RANKING_IMAGES]
    calibration_reference = run_graph(staging / "model.onnx", pixels)
    quantised = onnx.load(path)
    ranking = qdq_fallback.rank_by_sensitivity(
        quantised, lambda graph: run_graph(GraphInMemory(graph.SerializeToString(), target.name, f"{path.name} variant"),
                                           pixels), calibration_reference)
    fallback = {"criterion": f"mean |logits - fp32 logits| on {len(pixels)} calibration images, lowered by the "
                             "node alone in fp32",
                "quantised_nodes": len(ranking), "passed": False, "kept": [], "tries": []}
    for size in qdq_fallback.tries(len(ranking)):
        kept = [name for name, _ in ranking[:size]]
        graph = qdq_fallback.keep_fp32(quantised, kept)
        check_qdq_scales(graph, f"{path.name} with {size} node(s) in fp32")
        save_graph(graph, path, external_data_threshold)
        with graph_runner(GraphFile(path, target.name)) as runner:
            attempt = accuracy_gate(gate_reference, runner.infer(gate.pixels), target, gate)
            outputs = runner.infer(references.pixels) if attempt["passed"] else None
        fallback["tries"].append({"kept": size, "top1_agreement": attempt["top1_agreement"],
                                  "passed": attempt["passed"]})
        log(f"{target.name} gate with {size} of {len(ranking)} quantised node(s) in fp32: "
            f"{'pass' if attempt['passed'] else 'fail'}")
        if attempt["passed"]:
            result = compare_outputs(references.outputs, outputs)
            checks.add(f"onnx_{target.name}_vs_torch_fp32", result, within_tolerance(result, target.name),
                       target.gates_export, tolerance_criterion(target))
            fallback.update(passed=True, kept=kept)
            return {**attempt, "first_try": {key: record[key] for key in ("top1_agreement", "criteria", "passed")},
                    "fallback": fallback}
    return {**record, "fallback": fallback}


def _raise_if_failed(target: Precision, checks: Checks, record: dict | None, export_dir: Path) -> None:
    failed = [name for name in (f"onnx_{target.name}_vs_torch_fp32", f"head_{target.name}_vs_onnx_fp32")
              if name in checks and checks[name]["required"] and not checks[name]["passed"]]
    reasons = [f"checks failed: {', '.join(failed)}"] if failed else []
    if record is not None:
        record["checks_failed"] = failed
        if not record["passed"]:
            missed = "; ".join(c["criterion"] for c in record["criteria"] if not c["passed"])
            reasons.insert(0, f"accuracy gate failed on {record['images']} ({missed})")
        record["passed"] = record["passed"] and not failed
    if reasons:
        raise GateFailed(f"{target.name} {'; '.join(reasons)}; {export_dir} is unchanged",
                         record or {"precision": target.name, "checks_failed": failed, "passed": False})


def remove_precision(export_dir: Path, target: Precision,
                     manifest_format: tuple[str, int] = (FORMAT, FORMAT_VERSION)) -> bool:
    """Take ``target``'s graphs out of an export (a recipe that no longer asks for them);
    returns whether there were any."""
    manifest = read_manifest(Path(export_dir) / MANIFEST, *manifest_format, "export manifest")
    if not any(entry.get("precision") == target.manifest_name for entry in manifest["files"].values()):
        return False
    with rewritten(Path(export_dir), target, manifest_format) as rewrite:
        if "graphs" in rewrite.body:  # a backbone export's precision -> graph table
            rewrite.body["graphs"] = {kind: name for kind, name in rewrite.body["graphs"].items() if kind != target.name}
    return True
