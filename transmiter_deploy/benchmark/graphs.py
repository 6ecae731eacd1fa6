"""ONNX graphs of every benchmark part, exported once and reused between runs.

Each graph is exported through the same path as the deployed artifacts
(:func:`transmiter_deploy.deploy.trace.to_onnx`: TorchScript exporter, dynamic batch,
onnxslim, full checker), so ONNX Runtime times exactly what ``transmiter export``
ships. Exporting ViT-L-14 takes minutes, so graphs are cached under
``<work>/graphs/<key>.onnx`` with a JSON record of the code and library versions
that made them and the graph's MACs at batch 1; a record that does not match the
current code, or a file whose sha256 differs from its record, is exported again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import onnx
from tqdm import tqdm

from ..artifacts import library_versions, sha256_file, write_json
from ..deploy.graph_cost import count_macs_file
from ..deploy.trace import DEFAULT_OPSET, to_onnx
from ..runtimes.onnx_files import EXTERNAL_DATA_SUFFIX, save_graph
from ..runtimes.registry import precision, resolve
from .variants import TargetGroup

# Modules whose code shapes the exported graphs: a change to any of them re-exports.
_GRAPH_SOURCES = ("deploy/fusion.py", "method/adapter.py", "deploy/trace.py", "method/eft.py",
                  "benchmark/variants.py", "deploy/precisions/fp16.py", "deploy/precisions/int8.py")
# Calibration inputs per conversion, random pixels (the weights are random too; speed does not
# depend on values): as many as the export passes by default, 1 for the fp16 converter's range
# pass (one image finds the out-of-range nodes of random weights), 32 for int8.
CALIBRATION_IMAGES = {True: 32, False: 1}  # by Precision.needs_calibration


def code_digest(sources: tuple[str, ...] = _GRAPH_SOURCES) -> str:
    """sha256 of the package modules (paths relative to the package) whose code shapes a
    cached graph."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in sources:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes())
    return digest.hexdigest()


def _record(key: str, opset: int) -> dict:
    versions = library_versions()
    return {"key": key, "opset": opset, "code_sha256": code_digest(),
            "torch": versions.get("torch"), "onnx": versions.get("onnx"), "onnxslim": versions.get("onnxslim")}


def save_cached_graph(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    """``model`` saved as ``path`` (external data by the usual threshold, onnx_files.save_graph;
    not probed: these are the benchmark's work files, loaded right after). Written in a staging
    directory under the final name (a data file's location names it), then moved into place, data
    files first and the graph last, so a graph in place always has its data. Returns the data
    files' sha256 by name, for the record."""
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        written = save_graph(model, staging / path.name, probe=False)
        digests = {name: sha256_file(staging / name) for name in written}
        for name in written:
            os.replace(staging / name, path.parent / name)
        os.replace(staging / path.name, path)
        if not written:  # an earlier version of this graph may have left one
            path.with_name(path.name + EXTERNAL_DATA_SUFFIX).unlink(missing_ok=True)
        return digests
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_record(path: Path, record_path: Path, expected: dict) -> dict | None:
    """The record beside a cached graph when it holds every ``expected`` value and the graph
    (and each external data file it records) still has the sha256 it records; None when the
    graph must be made again."""
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if any(record.get(name) != value for name, value in expected.items()):
        return None
    if record.get("sha256") != sha256_file(path):
        return None
    data = record.get("external_data") or {}
    if not isinstance(data, dict) or any(not (path.parent / name).is_file() or sha256_file(path.parent / name) != digest
                                         for name, digest in data.items()):
        return None
    return record


def export_graphs(group: TargetGroup, work_dir: Path, opset: int = DEFAULT_OPSET,
                  progress: bool = False) -> tuple[dict[str, Path], dict[str, dict]]:
    """``({graph key: ONNX path}, {graph key: MACs by component at batch 1})`` for every part."""
    folder = Path(work_dir) / "graphs"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for variant in group.variants.values():
        for part in variant.parts:
            parts.setdefault(part.graph_key, (variant.takes, part))
    # fp32 graphs first: the reduced precisions are converted from them
    ordered = sorted(parts.items(), key=lambda item: item[1][1].precision != "fp32")
    paths, macs = {}, {}
    for key, (takes, part) in tqdm(ordered, desc=f"ONNX graphs {group.target}", unit="graph", disable=not progress):
        path, record_path = folder / f"{key}.onnx", folder / f"{key}.json"
        expected = {**_record(key, opset), "precision": part.precision}
        record = cached_record(path, record_path, expected)
        if record is None:
            input_name = "pixel_values" if takes == "pixels" else "image_features"
            start, peak = time.perf_counter(), None
            if part.precision == "fp32":
                model = to_onnx(part.module, group.example(takes, 2), input_name, "logits", opset, key)
                data = save_cached_graph(model, path)
                del model
            else:
                count = CALIBRATION_IMAGES[precision(part.precision).needs_calibration]
                peak, data = _convert_in_child(part.precision, paths[part.base_key], path,
                                               {input_name: group.example(takes, count).numpy()})
            record = {**expected, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                      **({"external_data": data} if data else {}),
                      "macs_batch1": count_macs_file(path), "made_s": round(time.perf_counter() - start, 1),
                      "conversion_peak_rss_mib": peak}
            write_json(record_path, record)
        paths[key], macs[key] = path, record["macs_batch1"]
    return paths, macs


def _convert_in_child(name: str, source: Path, target: Path, calibration: dict) -> tuple[float, dict[str, str]]:
    """Convert in a fresh process: its peak resident memory is the conversion's alone (the
    figure a user's machine must hold), and the benchmark's own process does not grow by it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_convert, name, str(source), str(target), calibration).result()


def _convert(name: str, source: str, target: str, calibration: dict) -> tuple[float, dict[str, str]]:
    data = save_cached_graph(resolve(precision(name).converter)(Path(source), calibration), Path(target))
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork and exec, so a spawned child
    # would report its parent's peak whenever that was higher
    status = Path("/proc/self/status").read_text().splitlines()
    return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1), data
