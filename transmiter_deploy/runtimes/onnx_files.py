"""ONNX graphs on disk: every way the toolkit writes, reads, links and checks a graph file.

Saving with or without external data (:func:`save_graph`, through which every graph is written,
then probed in ONNX Runtime), external tensors copied and pointed at one at a time, a graph's
structure read without its weights, the files of a graph checked against the export manifest
beside it (:func:`check_graph_files`, :func:`verify_graph_data`), the Q/DQ scale check, the
manifest entries of a graph and its data files, and :func:`checked_graph`: the checks every
runtime needs before it reads a graph, run once for all of them (``runtimes/base.py``'s
:class:`~.base.GraphRunner`).

External data: a graph over protobuf's 2 GB limit keeps its tensors in a data file beside it
(``model.onnx`` + ``model.onnx.data``). The graph names the file by a location relative to its
own directory, so a moved or copied export still loads; the export manifest lists and hashes
every data file (``external_data`` on the graph's entry, ``external_data_of`` on the data
file's), and every runner checks them before a runtime reads them: ONNX Runtime and TensorRT
would read a truncated, swapped or tampered data file without complaint, or fail with a message
that does not say which file is wrong.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from ..artifacts import MANIFESTS, read_json, sha256_file
from ..errors import InputError, IntegrityError, VerificationError
from .registry import PRECISIONS, REFERENCE_PRECISION, Precision, precision, precision_from_manifest

EXPORT_MANIFEST = MANIFESTS["export"]  # written beside every exported graph
# Protobuf cannot serialise a message over 2 GiB (2,147,483,648 bytes), so a graph whose tensors
# pass this many bytes keeps them in a data file beside it; the margin leaves room for the graph's
# structure itself.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2_000_000_000
PROTOBUF_LIMIT = 2**31  # bytes: the most one serialised protobuf message can hold
EXTERNAL_DATA_ENV = "TRANSMITER_EXTERNAL_DATA_THRESHOLD"  # tests force external data on small graphs
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
# Tensors under this many bytes stay inside the graph even when it has external data (onnx's own
# default): shape constants are read by shape inference and the MAC counter without the data file.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def resolve_external_data_threshold(setting: int | None = None) -> int:
    """The external-data threshold in bytes: ``setting`` when given (a recipe's or the CLI's), else
    the ``TRANSMITER_EXTERNAL_DATA_THRESHOLD`` environment variable, else just under 2 GiB."""
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise InputError(f"external_data_threshold must be a non-negative number of bytes, got {setting!r}")
        return setting
    text = os.environ.get(EXTERNAL_DATA_ENV, "").strip()
    if not text:
        return DEFAULT_EXTERNAL_DATA_THRESHOLD
    if not text.isdigit() or len(text) > 20:
        raise InputError(f"{EXTERNAL_DATA_ENV} must be a non-negative number of bytes, got '{text[:40]}'")
    return int(text)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes a graph's tensors take when serialised: what decides external data. Summed per
    tensor, because ``ModelProto.ByteSize`` is what cannot be computed past the 2 GiB limit."""
    return sum(tensor.ByteSize() for tensor in graph_tensors(model.graph))


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
    locations = set()
    for tensor in graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return sorted(locations)


def external_weights_as_inputs(structure: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Move ``structure``'s external initialisers (the weights, values not loaded) to graph inputs
    of their shape, in place, and return them: for graph tools that would read every
    initialiser's values (onnxslim, ONNX Runtime's symbolic shape inference) where only shapes
    matter. The small tensors held in the graph stay initialisers."""
    external = [tensor for tensor in structure.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    inline = [tensor for tensor in structure.graph.initializer if tensor.data_location != onnx.TensorProto.EXTERNAL]
    del structure.graph.initializer[:]
    structure.graph.initializer.extend(inline)
    structure.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                                 for tensor in external)
    return external


def graph_structure(path: Path) -> Any:
    """An ONNX graph's structure without its external data (nodes, I/O and tensor shapes: what
    inspecting a graph needs, at the memory of the graph file alone)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise InputError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from exc


def weights_apart(path: Path, work: Path) -> tuple[onnx.ModelProto, Path]:
    """The graph at ``path`` with every initialiser of ``EXTERNAL_TENSOR_MIN_BYTES`` or more in a data
    file, read as its structure alone, and the directory its locations are relative to: the graph's
    own when all its large tensors are external data already, else ``work``, where they are written
    one at a time (those in the graph, and those of the data files it points at: the TorchScript
    exporter, past 2 GiB, writes some tensors apart and keeps others in the graph). Graph rewrites
    then run at the memory of the structure, and read weights one by one."""
    path, work = Path(path), Path(work)
    structure = graph_structure(path)
    if not any(_inline_large(tensor) for tensor in structure.graph.initializer):
        return structure, path.parent
    write_external_tensors(structure, path.parent, work / "weights.onnx.data", move_inline=True)
    onnx.save_model(structure, str(work / "weights.onnx"))
    del structure  # read back rather than kept: protobuf's arena would hold the moved bytes until then
    return graph_structure(work / "weights.onnx"), work


def _inline_large(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING
            and tensor.ByteSize() >= EXTERNAL_TENSOR_MIN_BYTES)


def check_full(model: onnx.ModelProto | Path, what: str) -> None:
    """``onnx.checker``'s full check (shape inference included) of a graph in memory or in a file
    (with its external data beside it). The checker serialises an in-memory argument, which
    protobuf refuses past 2 GiB: such a graph is checked from a temporary copy written with
    external data, which the checker reads from its path."""
    try:
        if isinstance(model, Path):
            onnx.checker.check_model(str(model), full_check=True)
            return
        if tensor_bytes(model) < PROTOBUF_LIMIT - (64 << 20):
            onnx.checker.check_model(model, full_check=True)
            return
        with tempfile.TemporaryDirectory(prefix="transmiter-check-") as work:
            path = Path(work) / "graph.onnx"
            save_graph(model, path, external_data_threshold=0, probe=False)
            onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"{what} fails onnx.checker: {str(exc).splitlines()[0]}") from exc


# The open batches of probes_batched, innermost last.
_PROBE_BATCHES: list[list[Path]] = []


@contextmanager
def probes_batched() -> Iterator[None]:
    """Graphs that :func:`save_graph` writes inside this block are probed together, in one child
    process, when the block ends without an error (one interpreter start for an export's graphs
    instead of one per graph). Nothing in the block may open a session on them: the probe must
    come first."""
    batch: list[Path] = []
    _PROBE_BATCHES.append(batch)
    try:
        yield
    finally:
        _PROBE_BATCHES.remove(batch)
    if batch:
        require_loadable(batch)


def save_graph(model: onnx.ModelProto, path: Path, external_data_threshold: int | None = None,
               probe: bool = True, data_dir: Path | None = None) -> list[str]:
    """Write ``model`` to ``path``, its tensors in ``<name>.data`` beside it when they pass the
    threshold (:func:`resolve_external_data_threshold`); returns the data files written (names beside
    the graph; empty when the graph holds its tensors). The caller's ``model`` keeps its tensors.
    ``data_dir``: ``model`` is a structure whose tensors are external data relative to it; they are
    copied into the graph's data file one at a time (or read in, below the threshold).

    Then (``probe``) the graph must load and run in ONNX Runtime at every optimisation level, in
    a child process (a graph that would crash a user's session fails here, in one line, before
    any session of ours loads it); inside :func:`probes_batched`, when that block ends. Every
    graph the toolkit writes comes through here; exports write into a staging directory that
    replaces the artifact whole (artifacts.atomic_directory), so a graph and its data file appear
    together or not at all."""
    path = Path(path)
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    # onnx appends tensors to an existing data file (offsets past the stale bytes), and a file
    # linked in from the previous artifact (link_or_copy) must never be written through: start afresh
    data.unlink(missing_ok=True)
    apart = stored_bytes(model) > resolve_external_data_threshold(external_data_threshold)
    if data_dir is not None:
        if apart:
            write_external_tensors(model, Path(data_dir), data)
        else:
            onnx.external_data_helper.load_external_data_for_model(model, str(data_dir))
        onnx.save_model(model, path)
        written = external_data_locations(model)
    elif apart:
        # onnx moves the tensors' bytes into the file and clears them in ``model``; reading them
        # back leaves the caller's model as it was (verification and the MAC count use it next)
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=EXTERNAL_TENSOR_MIN_BYTES, convert_attribute=False)
        written = external_data_locations(model)  # what the file just written points at
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        for tensor in graph_tensors(model.graph):  # as it was: onnx leaves data_location set to DEFAULT
            if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
                tensor.ClearField("data_location")
    else:
        onnx.save_model(model, path)
        written = external_data_locations(model)
    if probe and _PROBE_BATCHES:
        _PROBE_BATCHES[-1].append(path)
    elif probe:
        require_loadable([path])
    return written


def stored_bytes(model: onnx.ModelProto) -> int:
    """:func:`tensor_bytes` plus the bytes of the tensors held as external data (by their length):
    what the graph's tensors take on disk, wherever they are."""
    external = sum(external_length(tensor, info) for tensor in graph_tensors(model.graph)
                   if (info := external_info(tensor)) is not None)
    return tensor_bytes(model) + external


def external_info(tensor: onnx.TensorProto) -> dict[str, str] | None:
    """An external tensor's ``external_data`` entries (location, offset, length) as a dict; None for
    a tensor held in the graph."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def external_length(tensor: onnx.TensorProto, info: dict[str, str]) -> int:
    """An external tensor's byte count: its ``length`` entry, which the format leaves optional (the
    TorchScript exporter writes none), else its shape times its element size."""
    if "length" in info:
        return int(info["length"])
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def write_external_tensors(model: onnx.ModelProto, source_dir: Path, data: Path,
                           convert: Callable[[onnx.TensorProto, dict[str, str], Path], bytes] | None = None,
                           move_inline: bool = False, chunk: int = 64 << 20) -> None:
    """Every external tensor of ``model`` written from where it lies (relative to ``source_dir``)
    into the one file ``data``, its location and offset rewritten to point there; a tensor at a
    time, so the memory this takes does not grow with the graph. ``convert``: the bytes to write
    for a tensor (``(tensor, external info, source_dir) -> bytes``, e.g. fp16's conversion), else
    the bytes are copied as they are, in chunks. ``move_inline``: initialisers of
    ``EXTERNAL_TENSOR_MIN_BYTES`` or more held in the graph are moved there too."""
    with open(data, "wb") as out:
        for tensor in graph_tensors(model.graph):
            info = external_info(tensor)
            if info is None:
                continue
            offset = out.tell()
            if convert is not None:
                out.write(convert(tensor, info, source_dir))
            else:
                _copy_bytes(source_dir / info["location"], int(info.get("offset", 0)), external_length(tensor, info),
                            out, chunk, tensor.name)
            point_at(tensor, data.name, offset, out.tell() - offset)
        for tensor in model.graph.initializer if move_inline else ():
            if not _inline_large(tensor):
                continue
            offset = out.tell()
            out.write(tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes())
            length = out.tell() - offset
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            point_at(tensor, data.name, offset, length)


def _copy_bytes(source: Path, offset: int, length: int, out, chunk: int, what: str) -> None:
    with open(source, "rb") as handle:
        handle.seek(offset)
        left = length
        while left:
            block = handle.read(min(chunk, left))
            if not block:
                raise VerificationError(f"{source} ends before tensor {what}")
            out.write(block)
            left -= len(block)


def point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` external data: ``length`` bytes at ``offset`` of the file ``location``."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def io_contract(model: onnx.ModelProto) -> dict[str, list[dict]]:
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


def file_entry(path: Path, kind: Precision, contract: dict[str, Any]) -> dict[str, Any]:
    """A file's entry in the export manifest: hash, size, precision (what runners read), contract."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "precision": kind.manifest_name, **contract}


def graph_entries(directory: Path, name: str, kind: Precision, contract: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest entries of file ``name`` (relative to ``directory``) and, for a graph with
    external data, of each data file it points at, in that order: the graph's entry lists its data
    files (``external_data``, names beside the graph, as the graph itself names them) and each data
    file's entry names its graph (``external_data_of``) and carries the graph's precision, so
    whatever adds, removes or links a precision's files takes the data files with them."""
    path = Path(directory) / name
    entries = {name: file_entry(path, kind, contract)}
    if not name.endswith(".onnx"):
        return entries
    locations = external_data_locations(graph_structure(path))
    if locations:
        entries[name]["external_data"] = locations
        prefix = str(Path(name).parent)
        for location in locations:
            data = path.parent / location
            entries[location if prefix == "." else f"{prefix}/{location}"] = {
                "sha256": sha256_file(data), "bytes": data.stat().st_size, "precision": kind.manifest_name,
                "external_data_of": path.name}
    return entries


def link_or_copy(source: Path, target: Path, copy: bool = False) -> None:
    """Artifacts are never modified in place, so the new directory may share their inodes.

    ``copy``: an external data file is copied instead. onnx (1.17+) refuses to read external data
    through a file with more than one hard link (its guard against hard-link attacks), so a linked
    data file would leave the graph unreadable to onnx.load, and to Polygraphy and ModelOpt, which
    read graphs with it (ONNX Runtime does not mind). The copy costs the data file's size on disk."""
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def is_external_data(entry: Any) -> bool:
    """Whether a manifest entry is an external data file's (:func:`graph_entries`)."""
    return isinstance(entry, dict) and "external_data_of" in entry

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


def graph_precision(path: Path, structure: onnx.ModelProto | None = None) -> str:
    """The precision of an ONNX graph: as the export manifest beside it records, else as its
    nodes and tensors show (Q/DQ nodes: int8; float16 initialisers: fp16). Never read from the
    file name. ``structure``: the graph as :func:`graph_structure` read it, when the caller has."""
    recorded = manifest_precision(path)
    if recorded is not None:
        return recorded
    graph = (structure if structure is not None else graph_structure(path)).graph
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return next(p.name for p in PRECISIONS.values() if p.qdq)
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return next(p.name for p in PRECISIONS.values() if p.manifest_name == "mixed-fp16")
    return REFERENCE_PRECISION


def check_qdq_scales(graph: Any, where: str) -> None:
    """Refuse a Q/DQ graph (an ``onnx.ModelProto``) whose quantisation scales are zero or not
    finite: ONNX Runtime and TensorRT would load it and return NaN or garbage."""
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
        scale = onnx.numpy_helper.to_array(tensor).astype(np.float64)
        if scale.size == 0 or not np.isfinite(scale).all() or (scale == 0).any():
            raise IntegrityError(f"{where}: {node.op_type} node '{node.name or node.output[0]}' has a zero or "
                                 f"non-finite scale (first values {scale.ravel()[:4].tolist()})")


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
    if not path.is_file():  # a graph whose locations the caller gave was not looked for yet
        raise IntegrityError(f"{where}: {path} is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise IntegrityError(f"{where}: {path} has {size} bytes, the manifest records {entry.get('bytes')} "
                             "(truncated or modified)")
    if sha256_file(path) != entry.get("sha256"):
        raise IntegrityError(f"{where}: {path} does not match the sha256 its manifest records (swapped or modified)")


def verify_graph_data(path: Path, structure: onnx.ModelProto | None = None) -> list[Path]:
    """A graph's external data files checked against the export manifest beside it
    (:func:`check_graph_files`) before a runtime loads the graph; returns their paths. A graph
    without external data needs nothing. A bare graph (no manifest beside it, as the benchmark's
    work graphs) has nothing to be checked against, as a bare graph without external data: its
    data files need only exist, so that a missing one is our one line rather than the runtime's.
    ``structure``: the graph as :func:`graph_structure` read it, when the caller has."""
    path = Path(path)
    locations = external_data_locations(structure if structure is not None else graph_structure(path))
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


def require_loadable(paths: list[Path], levels: tuple[str, ...] | None = None) -> None:
    """Every graph in ``paths`` loads and runs in ONNX Runtime's CPU provider at each optimisation
    level (default: all four), probed in a child process (:mod:`.load_probe`); else
    VerificationError naming the graph and the level. The toolkit calls this on each graph it
    writes (:func:`save_graph`) before its own sessions load it, so a graph that would crash a
    user's session fails the export in one line instead of killing it."""
    from . import load_probe

    failure = load_probe.probe([Path(path) for path in paths], levels or load_probe.LEVELS)
    if failure is not None:
        raise VerificationError(failure)


@dataclass(frozen=True)
class CheckedGraph:
    """A graph that passed the checks every runtime needs before it reads one: a file (its data
    files beside it, checked) or a serialised graph held in memory."""

    precision: str  # the registry's name (fp32, fp16, int8), as the manifest records it
    path: Path | None = None
    serialized: bytes | None = None
    data_files: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()  # the graph's output names, in order (a file's, read with its checks)

    def model(self) -> str | bytes:
        """What a runtime's loader reads: the file's path (a runtime resolves external data beside
        it, without a second copy in Python's memory) or the serialised graph."""
        return self.serialized if self.serialized is not None else str(self.path)


def checked_graph(path: Path, recorded_precision: str | None = None) -> CheckedGraph:
    """The checks every runtime needs before reading the graph at ``path``, in one place: its
    external data files against the export manifest beside it (:func:`verify_graph_data`), its
    precision (``recorded_precision``, else the manifest's, else read from its nodes: never from
    the file name), and, for a Q/DQ graph, finite non-zero scales (runtimes would load it and
    return NaN or garbage). InputError when it is not a readable ONNX graph, IntegrityError when
    a file does not match its manifest."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX graph not found: {path}")
    structure = graph_structure(path)  # read once for all three checks
    data_files = verify_graph_data(path, structure)
    kind = recorded_precision or graph_precision(path, structure)
    if precision(kind).qdq:
        # without external data the structure is the whole graph; else the scales may be apart
        check_qdq_scales(onnx.load(str(path)) if data_files else structure, str(path))
    return CheckedGraph(kind, path=path, data_files=tuple(data_files),
                        outputs=tuple(output.name for output in structure.graph.output))


def checked_graph_in_memory(graph: Any) -> CheckedGraph:
    """:func:`checked_graph` for a ``base.GraphInMemory``: nothing on disk to verify; a Q/DQ
    graph's scales are checked."""
    if precision(graph.precision).qdq:
        try:
            model = onnx.load_from_string(graph.serialized)
        except Exception as exc:  # onnx raises DecodeError and friends for corrupt bytes
            raise InputError(f"not a readable ONNX model: {str(exc).splitlines()[0]}") from exc
        check_qdq_scales(model, graph.name)
    return CheckedGraph(graph.precision, serialized=graph.serialized)
