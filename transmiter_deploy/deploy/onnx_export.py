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
the tensors, both listed and hashed in the manifest (:func:`save_graph`, :func:`graph_entries`).

The TorchScript exporter (``dynamo=False``) is used: it needs no extra
packages and its dynamic batch axis is verified by running batches of two
sizes through ONNX Runtime.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch

from ..artifacts import MANIFESTS, atomic_directory, read_json, read_manifest, sha256_file, write_json, write_manifest
from ..errors import WRITE_ERRNOS, InputError, VerificationError, write_failure
from ..host import release_freed_memory
from ..features.adapter_artifact import AdapterArtifact, check_adapter_head
from ..features.heads import ZeroShotHead
from ..features.models import LoadedModel
from ..runtimes.base import check_qdq_scales, external_data_locations, graph_structure, graph_tensors
from ..runtimes.compare import compare_outputs, within_tolerance
from ..runtimes.onnxruntime import ort_session, require_loadable, run_session
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION, Precision, default_precisions, precision, resolve
from .fusion import FP32_NODES, DeployedClassifier, FoldedHead, UnfoldedHead
from .calibration import Calibration
from .export_memory import check_export_memory
from . import qdq_fallback
from .gate import GateFailed, GateImages, accuracy_gate
from .graph_cost import count_macs
from .head_weights import HEAD_FILE, HEAD_FORMAT, HEAD_FORMAT_VERSION, head_logits_numpy, write_head_safetensors

FORMAT = "transmiter-deploy/onnx-export"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["export"]
DEFAULT_OPSET = 17
FP32_LOGIT_ATOL = PRECISIONS[REFERENCE_PRECISION].max_abs
GRAPHS = ("model", "head")  # pixels -> logits, features -> logits: one file each per precision
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
class References:
    """What PyTorch computed on the parity images: validation compares every runtime to it."""

    pixels: np.ndarray  # preprocessed parity images
    outputs: np.ndarray  # the fused classifier's outputs (logits, or probabilities with softmax)


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


def to_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
            opset: int, what: str, work_dir: Path | None = None) -> onnx.ModelProto:
    """Trace to ONNX with a dynamic batch axis, simplify with onnxslim, check fully; the graph in
    memory, with its tensors (:func:`export_graph` writes a large one without holding them)."""
    with _traced(module, example, input_name, output_name, opset, what, work_dir) as (model, data_dir):
        onnx.external_data_helper.load_external_data_for_model(model, str(data_dir))
    return model


def export_graph(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                 opset: int, what: str, path: Path, external_data_threshold: int | None = None) -> list[str]:
    """:func:`to_onnx` written to ``path`` as :func:`save_graph` writes it (external data past the
    threshold, the load probe), the weights copied from the trace's data file one tensor at a time:
    a large tower's graph never has its weights in memory beside the PyTorch tower's."""
    with _traced(module, example, input_name, output_name, opset, what, Path(path).parent) as (model, data_dir):
        return save_graph(model, path, external_data_threshold, data_dir=data_dir)


@contextmanager
def _traced(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str, opset: int,
            what: str, work_dir: Path | None) -> Iterator[tuple[onnx.ModelProto, Path]]:
    """The traced, simplified and checked graph's structure, and the directory of the data file its
    tensors are in (a temporary directory, gone when the context exits).

    The exporter writes into a file in a temporary directory rather than a buffer: past 2 GiB it
    can only write external data, and only beside a file. An export passes its staging directory
    as ``work_dir``, so the trace takes room on the artifact's own disk (not /tmp, often smaller)
    and a full disk is reported against the artifact (exit 5)."""
    import onnxslim

    with tempfile.TemporaryDirectory(prefix=".trace-", dir=work_dir) as work:
        traced = Path(work) / "traced.onnx"
        try:
            # Under no_grad, nn.MultiheadAttention takes a fused fast path
            # (aten::_native_multi_head_attention) that has no ONNX symbolic: the fast path is
            # switched off rather than tracing with grad mode on, which records for a backward pass.
            with warnings.catch_warnings(), torch.no_grad(), _mha_fast_path(False):
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    module, (example,), str(traced), dynamo=False, opset_version=opset,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:  # the trace's own file: a full disk, not an untraceable model
                raise write_failure(exc, str(work_dir or traced.parent)) from exc
            raise InputError(f"cannot export {what} to ONNX: {exc}") from exc
        except Exception as exc:  # the exporter raises many types; all mean "cannot trace this"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot export {what} to ONNX: {first}") from exc
        release_freed_memory()  # the exporter's own copies of the weights
        structure, data_dir = weights_apart(traced, Path(work))
        model = _slim_structure(structure, onnxslim.slim)
        del structure
        # checked as a structure beside its data file: the checker reads the graph from the path
        # and never the weights (in memory, it would hold the serialised graph twice more)
        checked = data_dir / f".checked-{uuid.uuid4().hex}.onnx"
        try:
            onnx.save_model(model, str(checked))
            check_full(checked, f"exported {what}")
        finally:
            checked.unlink(missing_ok=True)
        yield model, data_dir


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
    _copy_external_data(structure, path.parent, work / "weights.onnx.data", move_inline=True)
    onnx.save_model(structure, str(work / "weights.onnx"))
    del structure  # read back rather than kept: protobuf's arena would hold the moved bytes until then
    return graph_structure(work / "weights.onnx"), work


def _inline_large(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING
            and tensor.ByteSize() >= EXTERNAL_TENSOR_MIN_BYTES)


def _slim_structure(structure: onnx.ModelProto, slim: Callable) -> onnx.ModelProto:
    """onnxslim on a graph whose external tensors are graph inputs for the time of the call.

    onnxslim copies every weight into its own graph representation (5.7x the weights' size at
    its peak, measured on ViT-B-16) and reads the values of the Constants it inspects. Weights
    presented as inputs of fixed shape are neither copied nor read, and any rewrite onnxslim makes
    around them holds whatever their values are; the shape arithmetic it exists to fold uses small
    tensors, which stay in the graph. (The exporter's own constant folding has already folded the
    weights' transposes.)"""
    weights = [tensor for tensor in structure.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    names = {tensor.name for tensor in weights}
    kept = [tensor for tensor in structure.graph.initializer if tensor.name not in names]
    del structure.graph.initializer[:]
    structure.graph.initializer.extend(kept)
    structure.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                                 for tensor in weights)
    slimmed = slim(structure)
    used = {name for node in slimmed.graph.node for name in node.input}
    inputs = [value for value in slimmed.graph.input if value.name not in names]
    del slimmed.graph.input[:]
    slimmed.graph.input.extend(inputs)
    slimmed.graph.initializer.extend(tensor for tensor in weights if tensor.name in used)
    return slimmed


@contextmanager
def _mha_fast_path(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


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
            _copy_external_data(model, Path(data_dir), data)
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


def _copy_external_data(model: onnx.ModelProto, source_dir: Path, data: Path, chunk: int = 64 << 20,
                        move_inline: bool = False) -> None:
    """Every external tensor of ``model`` copied from where it lies (relative to ``source_dir``) into
    the one file ``data``, its location and offset rewritten to point there; a tensor at a time, in
    chunks, so the memory this takes does not grow with the graph. ``move_inline``: initialisers
    of ``EXTERNAL_TENSOR_MIN_BYTES`` or more held in the graph are moved there too."""
    with open(data, "wb") as out:
        for tensor in graph_tensors(model.graph):
            info = external_info(tensor)
            if info is None:
                continue
            length, offset = external_length(tensor, info), out.tell()
            with open(source_dir / info["location"], "rb") as source:
                source.seek(int(info.get("offset", 0)))
                left = length
                while left:
                    block = source.read(min(chunk, left))
                    if not block:
                        raise VerificationError(f"{source_dir / info['location']} ends before tensor {tensor.name}")
                    out.write(block)
                    left -= len(block)
            point_at(tensor, data.name, offset, length)
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


def _modules(model: LoadedModel, head: ZeroShotHead, artifact: AdapterArtifact, pixels: torch.Tensor,
             settings: ExportSettings) -> _Modules:
    folded = FoldedHead(head, artifact, settings.sigma_mode)
    unfolded = UnfoldedHead(head, artifact)
    fused = DeployedClassifier(model.model.visual, folded, softmax=settings.softmax)
    with torch.no_grad():
        # The backbone runs once; the PyTorch references are composed from its
        # features independently of DeployedClassifier, which the export traces.
        features = torch.nn.functional.normalize(model.model.visual(pixels).float(), dim=-1)
        head_logits, unfolded_logits = folded(features), unfolded(features)
        if settings.softmax:
            fused_outputs, unfolded_logits = head_logits.softmax(dim=-1), unfolded_logits.softmax(dim=-1)
        else:
            fused_outputs = head_logits
    return _Modules(fused, folded, unfolded, features, fused_outputs.numpy(), head_logits.numpy(),
                    unfolded_logits.numpy())


class Checks(dict):
    """The parity table: name -> comparison, verdict, whether it gates the export, criterion."""

    def add(self, name: str, result: dict, passed: bool, required: bool, criterion: str) -> None:
        self[name] = {**result, "passed": bool(passed), "required": required, "criterion": criterion}


def _verify_fp32(staging: Path, parts: _Modules, pixels: torch.Tensor, checks: Checks) -> None:
    """ONNX Runtime (two batch sizes) and the head file's own reading against PyTorch."""
    atol = FP32_LOGIT_ATOL
    session = ort_session(staging / "model.onnx")
    ort_fp32 = run_session(session, pixels.numpy())
    ort_fp32_odd = run_session(session, pixels[:3].numpy())  # a second batch size: the axis is really dynamic
    ort_head = run_session(ort_session(staging / "head.onnx"), parts.features.numpy())
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


def convert_graph(directory: Path, stem: str, target: Precision, inputs: dict[str, np.ndarray],
                  external_data_threshold: int | None = None) -> str:
    """``directory/<stem>.onnx`` converted to ``target`` by its registry converter (the
    statistic nodes kept fp32), saved beside it (external data by ``external_data_threshold``,
    whatever the fp32 graph had): by its ``file_converter`` where it has one (the converted graph
    never in memory whole), else saved from the converter's graph; returns the new file's name."""
    if target.file_converter is not None:
        resolve(target.file_converter)(directory / f"{stem}.onnx", directory / target.graph_name(stem), inputs,
                                       FP32_NODES, external_data_threshold)
        return target.graph_name(stem)
    convert: Callable = resolve(target.converter)
    converted = convert(directory / f"{stem}.onnx", inputs, FP32_NODES)
    if target.qdq:
        check_qdq_scales(converted, f"{target.graph_name(stem)} as converted")
    save_graph(converted, directory / target.graph_name(stem), external_data_threshold)
    del converted
    release_freed_memory()
    return target.graph_name(stem)


def tolerance_criterion(target: Precision) -> str:
    """``target``'s registry tolerance against fp32, as the parity table states it."""
    return f"finite, top-1 agreement >= {target.top1:.1%}" + (
        f", max_abs <= {target.max_abs}" if target.max_abs is not None else "") + " (ONNX Runtime CPU)"


def _convert(staging: Path, target: Precision, calibration: dict[str, dict[str, np.ndarray]],
             pixels: np.ndarray, model_reference: np.ndarray, features: np.ndarray, head_reference: np.ndarray,
             checks: Checks, head_reference_name: str = "torch", external_data_threshold: int | None = None) -> list[str]:
    """``target``'s model and head graphs from the fp32 ones in ``staging``, each checked against
    its fp32 reference outputs (``calibration``: per graph stem, the converter's input arrays)."""
    with probes_batched():
        files = [convert_graph(staging, stem, target, calibration[stem], external_data_threshold) for stem in GRAPHS]
    criterion = tolerance_criterion(target)
    result = compare_outputs(model_reference, run_session(ort_session(staging / target.graph_name("model")), pixels))
    checks.add(f"onnx_{target.name}_vs_torch_fp32", result, within_tolerance(result, target.name),
               target.gates_export, criterion)
    result = compare_outputs(head_reference, run_session(ort_session(staging / target.graph_name("head")), features))
    checks.add(f"head_{target.name}_vs_{head_reference_name}_fp32", result, result["finite"], True, "finite outputs")
    return files


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
        "opset": settings.opset,
        "fp32_nodes_in_fp16_graphs": list(FP32_NODES),
        "source_model": artifact.source_model.to_dict(),
        "target_model": model.identity.to_dict(),
        "adapter": {"stage": artifact.stage, "config": artifact.adapter.config.to_dict(),
                    "sigma_mode": parts.folded.sigma_mode, "provenance": artifact.provenance},
        "head_sha256": head.weights_sha256,
        "adapter_sha256": artifact.weights_sha256,
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
            converted = _convert(staging, target, converter_inputs, pixels.numpy(), parts.fused_outputs,
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


@dataclass
class _Rewrite:
    staging: Path
    body: dict[str, Any]  # the manifest without its format tag, versions and date
    parity: dict[str, Any]


@contextmanager
def _rewritten(export_dir: Path, target: Precision) -> Iterator[_Rewrite]:
    """A new version of a verified export without ``target``'s files, checks, gate and
    calibration record, replacing the old one atomically when the block ends without error."""
    manifest = read_manifest(export_dir / MANIFEST, FORMAT, FORMAT_VERSION, "export manifest")
    parity = read_json(export_dir / "parity.json", "parity report")
    body = {key: value for key, value in manifest.items() if key not in ("format", "format_version", "versions", "created")}
    body["files"] = {name: entry for name, entry in manifest["files"].items()
                     if entry.get("precision") != target.manifest_name}
    body.get("calibration", {}).pop(target.name, None)
    parity["checks"] = {name: check for name, check in parity["checks"].items() if f"_{target.name}_vs_" not in name}
    parity.get("gates", {}).pop(target.name, None)
    with atomic_directory(export_dir, MANIFEST) as staging:
        for name in [*body["files"], "parity.json"]:
            link_or_copy(export_dir / name, staging / name, copy=is_external_data(body["files"].get(name)))
        rewrite = _Rewrite(staging, body, parity)
        yield rewrite
        write_json(staging / "parity.json", rewrite.parity)
        write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, rewrite.body)


def add_precision(export_dir: Path, target: Precision, calibration: dict[str, dict[str, np.ndarray]],
                  references: References, calibration_record: dict, gate: GateImages | None = None,
                  log=print, external_data_threshold: int | None = None) -> dict | None:
    """Convert the fp32 graphs of a verified export to ``target`` and add them to it, atomically:
    checked against the PyTorch references, then gated on ``gate``'s images. Returns the gate's
    table; a failed check or gate raises (GateFailed carries the table) and leaves the export
    as it was."""
    export_dir, start = Path(export_dir), time.perf_counter()
    with _rewritten(export_dir, target) as rewrite:
        staging, checks = rewrite.staging, Checks(rewrite.parity["checks"])
        features = calibration["head"]["image_features"]
        head_reference = run_session(ort_session(staging / "head.onnx"), features)
        files = _convert(staging, target, calibration, references.pixels, references.outputs, features,
                         head_reference, checks, head_reference_name="onnx",
                         external_data_threshold=external_data_threshold)
        record = None
        if gate is not None:
            reference = run_session(ort_session(staging / "model.onnx"), gate.pixels)
            candidate = run_session(ort_session(staging / target.graph_name("model")), gate.pixels)
            record = accuracy_gate(reference, candidate, target, gate)
            if not record["passed"] and target.qdq:
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
    calibration_reference = run_session(ort_session(staging / "model.onnx"), pixels)
    quantised = onnx.load(path)
    ranking = qdq_fallback.rank_by_sensitivity(
        quantised, lambda graph: run_session(ort_session(graph.SerializeToString()), pixels), calibration_reference)
    fallback = {"criterion": f"mean |logits - fp32 logits| on {len(pixels)} calibration images, lowered by the "
                             "node alone in fp32",
                "quantised_nodes": len(ranking), "passed": False, "kept": [], "tries": []}
    for size in qdq_fallback.tries(len(ranking)):
        kept = [name for name, _ in ranking[:size]]
        graph = qdq_fallback.keep_fp32(quantised, kept)
        check_qdq_scales(graph, f"{path.name} with {size} node(s) in fp32")
        save_graph(graph, path, external_data_threshold)
        session = ort_session(path)
        attempt = accuracy_gate(gate_reference, run_session(session, gate.pixels), target, gate)
        fallback["tries"].append({"kept": size, "top1_agreement": attempt["top1_agreement"],
                                  "passed": attempt["passed"]})
        log(f"{target.name} gate with {size} of {len(ranking)} quantised node(s) in fp32: "
            f"{'pass' if attempt['passed'] else 'fail'}")
        if attempt["passed"]:
            result = compare_outputs(references.outputs, run_session(session, references.pixels))
            checks.add(f"onnx_{target.name}_vs_torch_fp32", result, within_tolerance(result, target.name),
                       target.gates_export, tolerance_criterion(target))
            fallback.update(passed=True, kept=kept)
            return {**attempt, "first_try": {key: record[key] for key in ("top1_agreement", "criteria", "passed")},
                    "fallback": fallback}
    return {**record, "fallback": fallback}


def _raise_if_failed(target: Precision, checks: Checks, record: dict | None, export_dir: Path) -> None:
    failed = [name for name in (f"onnx_{target.name}_vs_torch_fp32", f"head_{target.name}_vs_onnx_fp32")
              if checks[name]["required"] and not checks[name]["passed"]]
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


def remove_precision(export_dir: Path, target: Precision) -> bool:
    """Take ``target``'s graphs out of an export (a recipe that no longer asks for them);
    returns whether there were any."""
    manifest = read_manifest(Path(export_dir) / MANIFEST, FORMAT, FORMAT_VERSION, "export manifest")
    if not any(entry.get("precision") == target.manifest_name for entry in manifest["files"].values()):
        return False
    with _rewritten(Path(export_dir), target):
        pass
    return True


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
