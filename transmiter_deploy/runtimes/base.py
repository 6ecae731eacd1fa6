"""The runner interface every runtime implements, and the input check they share.

A runner takes a float32 batch shaped like the graph's input and returns the
graph's output as a float32 array. Runners follow Polygraphy's life cycle:
constructing one validates its configuration and loads nothing; ``activate()``
(or entering a ``with`` block) loads the model, session or engine;
``deactivate()`` frees it. A benchmark or an export can therefore hold many
runners and pay for one at a time. Every runner checks its input the same way
(dtype, rank, fixed dimensions, batch range) and refuses a mismatch in one line,
so a wrong array never reaches a runtime that would crash or silently broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..artifacts import read_json
from ..errors import InputError, IntegrityError
from .registry import PRECISIONS, REFERENCE_PRECISION, precision_from_manifest

EXPORT_MANIFEST = "manifest.json"  # written beside every exported graph (deploy/onnx_export.py)


@dataclass(frozen=True)
class InputSpec:
    """What a runner accepts: float32, this rank, these fixed sizes (None = the batch axis)."""

    name: str
    shape: tuple[int | None, ...]
    min_batch: int = 1
    max_batch: int | None = None

    def check(self, array: np.ndarray, runner: str) -> None:
        if not isinstance(array, np.ndarray):
            raise InputError(f"{runner}: input must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise InputError(f"{runner}: input '{self.name}' must be float32, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise InputError(f"{runner}: input '{self.name}' must have rank {len(self.shape)} "
                             f"{self._describe()}, got shape {tuple(array.shape)}")
        for axis, (want, got) in enumerate(zip(self.shape[1:], array.shape[1:]), start=1):
            if want is not None and want != got:
                raise InputError(f"{runner}: input '{self.name}' must be {self._describe()}, "
                                 f"got {tuple(array.shape)} (axis {axis})")
        batch = array.shape[0]
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            upper = self.max_batch if self.max_batch is not None else "any"
            raise InputError(f"{runner}: batch {batch} is outside {self.min_batch}..{upper}")

    def _describe(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.shape) + ")"


class Runner:
    """Base of every runner: the life cycle, the input check, the timed call.

    Subclasses implement ``activate_impl`` (load; set ``self.input_spec`` if it comes
    from the loaded graph), ``infer_impl`` (one batch, already checked) and
    ``deactivate_impl`` (free), and ``unavailable`` (why this runtime cannot run here).
    """

    name: str = "runner"  # the runtime, e.g. onnxruntime-cpu
    graph: str = "-"  # what it runs, e.g. model_fp16.onnx
    precision: str = REFERENCE_PRECISION
    input_spec: InputSpec | None = None

    def __init__(self) -> None:
        self.active = False

    @classmethod
    def unavailable(cls, **options: Any) -> str | None:
        """None when this runner can run here with these options, else the reason it cannot."""
        return None

    def activate(self) -> "Runner":
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._require_active()
        self.input_spec.check(batch, self.name)
        return self.infer_impl(batch)

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph, by name, in the graph's order (a task bank has one per
        task); ``infer`` returns the first."""
        self._require_active()
        self.input_spec.check(batch, self.name)
        return self.outputs_impl(batch)

    def timed_call(self, batch: np.ndarray) -> Callable[[], object]:
        """A zero-argument call that runs ``batch`` to completion: what a benchmark times.
        Runtimes that keep inputs on a device place them there first (outside the call)."""
        self._require_active()
        self.input_spec.check(batch, self.name)
        return lambda: self.infer_impl(batch)

    def _require_active(self) -> None:
        if not self.active:
            raise RuntimeError(f"{self.name}: activate() the runner (or use it in a with block) before running it")

    def activate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def deactivate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Runtimes whose graphs can have several outputs override this."""
        return {"output": self.infer_impl(batch)}


def manifest_precision(path: Path) -> str | None:
    """The precision the export manifest beside an ONNX graph records for it, if there is one."""
    path = Path(path)
    manifest = path.parent / EXPORT_MANIFEST
    if not manifest.is_file():
        return None
    files = read_json(manifest, "export manifest").get("files")
    entry = files.get(path.name) if isinstance(files, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("precision"), str):
        return precision_from_manifest(entry["precision"]).name
    return None


def graph_precision(path: Path) -> str:
    """The precision of an ONNX graph: as the export manifest beside it records, else as its
    nodes and tensors show (Q/DQ nodes: int8; float16 initialisers: fp16). Never read from the
    file name."""
    recorded = manifest_precision(path)
    if recorded is not None:
        return recorded
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise InputError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from exc
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return next(p.name for p in PRECISIONS.values() if p.qdq)
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return next(p.name for p in PRECISIONS.values() if p.manifest_name == "mixed-fp16")
    return REFERENCE_PRECISION


def check_qdq_scales(graph: Any, where: str) -> None:
    """Refuse a Q/DQ graph (an ``onnx.ModelProto``) whose quantisation scales are zero or not
    finite: ONNX Runtime and TensorRT would load it and return NaN or garbage."""
    from onnx import numpy_helper

    values = {tensor.name: tensor for tensor in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    for node in graph.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        tensor = values.get(node.input[1])
        if tensor is None:
            continue  # a computed scale: nothing to read statically
        scale = numpy_helper.to_array(tensor).astype(np.float64)
        if scale.size == 0 or not np.isfinite(scale).all() or (scale == 0).any():
            raise IntegrityError(f"{where}: {node.op_type} node '{node.name or node.output[0]}' has a zero or "
                                 f"non-finite scale (first values {scale.ravel()[:4].tolist()})")


# ---- ONNX external data ---------------------------------------------------------------------
# A graph over protobuf's 2 GB limit keeps its tensors in a data file beside it (ONNX external
# data: ``model.onnx`` + ``model.onnx.data``, deploy/onnx_export.py:save_graph). The graph names
# the file by a location relative to its own directory, so a moved or copied export still loads;
# the export manifest lists and hashes every data file (``external_data`` on the graph's entry,
# ``external_data_of`` on the data file's), and every loader checks them before a runtime reads
# them: ONNX Runtime and TensorRT would read a truncated, swapped or tampered data file without
# complaint, or fail with a message that does not say which file is wrong.


def graph_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of an ``onnx.GraphProto``: initialisers, Constant values, subgraphs'."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from graph_tensors(subgraph)


def external_data_locations(model: Any) -> list[str]:
    """The data files an ``onnx.ModelProto``'s tensors point at, as the graph names them (relative
    to the graph's directory), sorted; empty for a graph that holds all its tensors."""
    from onnx import TensorProto

    locations = set()
    for tensor in graph_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return sorted(locations)


def graph_structure(path: Path) -> Any:
    """An ONNX graph's structure without its external data (nodes, I/O and tensor shapes: what
    inspecting a graph needs, at the memory of the graph file alone)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise InputError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from exc


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def check_graph_files(directory: Path, name: str, files: dict[str, Any], where: str,
                      locations: list[str] | None = None) -> list[str]:
    """Check graph ``name`` (a key of a manifest's ``files``, relative to ``directory``) and its
    external data files against ``files`` before anything loads them: the graph's own size and
    sha256, that the data files it points at are the ones its entry lists, and each data file's
    size and sha256. Returns the data files' keys in ``files``. A graph without external data is
    left alone (the runtimes that read it check it as they always have). ``locations``: what the
    graph points at, when the caller has read it already. Any mismatch is an IntegrityError naming
    the file (a missing, renamed, truncated, swapped or modified data file; a graph pointing at
    a file its manifest does not list)."""
    directory = Path(directory)
    graph_path = directory / name
    entry = files.get(name)
    if locations is None:
        if not graph_path.is_file():
            raise IntegrityError(f"{where}: {graph_path} is missing")
        locations = external_data_locations(graph_structure(graph_path))
    listed = entry.get("external_data", []) if isinstance(entry, dict) else []
    if not locations and not listed:
        return []
    if not isinstance(entry, dict):
        raise IntegrityError(f"{where}: {graph_path} keeps its tensors in external data, but the manifest does not list it")
    if not isinstance(listed, list) or not all(isinstance(item, str) and _plain_name(item) for item in listed):
        raise IntegrityError(f"{where}: files['{name}'].external_data must be a list of file names beside the graph")
    strays = [location for location in locations if location not in listed]
    if strays:
        raise IntegrityError(f"{where}: {graph_path} points at external data '{strays[0]}', which its manifest entry "
                             f"does not list (renamed or swapped graph?)")
    _check_file(graph_path, entry, where)
    prefix = str(Path(name).parent)
    keys = []
    for location in listed:
        key = location if prefix == "." else f"{prefix}/{location}"
        data_entry = files.get(key)
        if not isinstance(data_entry, dict) or data_entry.get("external_data_of") != Path(name).name:
            raise IntegrityError(f"{where}: the manifest lists no data file '{key}' of {name}")
        path = directory / key
        if not path.is_file():
            raise IntegrityError(f"{where}: the external data file {path} of {name} is missing (renamed or deleted?)")
        _check_file(path, data_entry, where)
        keys.append(key)
    return keys


def _check_file(path: Path, entry: dict[str, Any], where: str) -> None:
    from ..artifacts import sha256_file

    if not path.is_file():  # a graph whose locations the caller gave was not looked for yet
        raise IntegrityError(f"{where}: {path} is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise IntegrityError(f"{where}: {path} has {size} bytes, the manifest records {entry.get('bytes')} "
                             "(truncated or modified)")
    if sha256_file(path) != entry.get("sha256"):
        raise IntegrityError(f"{where}: {path} does not match the sha256 its manifest records (swapped or modified)")


def verify_graph_data(path: Path) -> list[Path]:
    """A graph's external data files checked against the export manifest beside it
    (:func:`check_graph_files`) before a runtime loads the graph; returns their paths. A graph
    without external data needs nothing. A bare graph (no manifest beside it, as the benchmark's
    work graphs) has nothing to be checked against, as a bare graph without external data: its
    data files need only exist, so that a missing one is our one line rather than the runtime's."""
    path = Path(path)
    locations = external_data_locations(graph_structure(path))
    if not locations:
        return []
    manifest = path.parent / EXPORT_MANIFEST
    if not manifest.is_file():
        bad = next((name for name in locations if not _plain_name(name) or not (path.parent / name).is_file()), None)
        if bad is not None:
            raise IntegrityError(f"the external data file {path.parent / bad} of {path.name} is missing (renamed or deleted?)")
        return [path.parent / name for name in locations]
    files = read_json(manifest, "export manifest").get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{manifest}: 'files' must be an object")
    keys = check_graph_files(path.parent, path.name, files, str(manifest), locations)
    return [path.parent / key for key in keys]
