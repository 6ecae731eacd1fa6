"""Mixed fp16 for TensorRT's strongly typed networks, in memory bounded by the graph's size.

fp16 weights and GEMMs; the feature normalisation, the statistics (mean, sigma, the division
by sigma) and the de-standardisation stay fp32, and so do the graph's inputs and outputs, and
every node whose inputs or outputs pass ``DATA_MAX`` on the calibration images.

How, and why not ModelOpt AutoCast (the converter before): AutoCast holds several copies of
the graph at once and runs its reference pass with every intermediate tensor as an output.
Measured on this project's 2-core machine (ViT-B-16, a 0.38 GB fp32 graph, one calibration
image; RSS above the interpreter's 0.8-0.9 GB): 3.1 GB with its reference run, 1.7 GB without
it (4.6x the graph, and without the run there is no range rule); ViT-L-14's fp16 export
peaked at 22.4 GB. Here the same decisions are made in three passes that each hold
at most one copy of the weights:

1. the graph's structure is read without its tensors (a graph that holds them inline has them
   moved to a data file in a temporary directory first: onnx writes them one at a time);
2. AutoCast's two range rules, computed in pieces: ONNX Runtime runs the fp32 graph on the
   calibration images with a bounded group of intermediate tensors as extra outputs per
   session (``PROBE_BUDGET_BYTES``), keeping only each tensor's max |x|; initialisers beyond
   fp16's range are read one at a time;
3. onnxconverter-common (Microsoft's ONNX float16 converter) rewrites the structure, Cast
   nodes and value types, with the nodes of 2. and the named statistic nodes blocked; the
   weights are then read one at a time from the data file and converted with its own
   ``convert_np_to_float16``: into the graph (:func:`convert`), or straight into the new graph's
   data file (:func:`convert_to_file`, what exports use: the converted tensors are never all in
   memory either).
"""

from __future__ import annotations

import re
import tempfile
import uuid
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from ...errors import DependencyError, InputError
from ...host import release_freed_memory
from ...runtimes.onnx_files import (check_full, external_info, external_length, graph_tensors, save_graph,
                                    weights_apart, write_external_tensors)
from ..consumer_safety import move_transposes_after_matmuls
from ..fusion import FP32_NODES

# A node is kept fp32 when an input or output passes this on the calibration images: AutoCast's
# default (data_max), leaving fp16's 65504 room for the larger inputs of deployment.
DATA_MAX = 512.0
FP16_MAX = float(np.finfo(np.float16).max)  # an initialiser beyond it cannot be stored in fp16
# Intermediate tensors fetched per ONNX Runtime session in the range pass: bounds the pass's
# activations (one calibration image through ViT-bigG-14's 48 blocks makes several GB of them,
# by their shapes) for a session load per group (the weights read again each time, from the
# page cache).
PROBE_BUDGET_BYTES = 128 << 20


def convert(fp32_path: Path, calibration: dict[str, np.ndarray],
            fp32_nodes: tuple[str, ...] = FP32_NODES) -> onnx.ModelProto:
    """The mixed-precision graph of ``fp32_path`` with ``fp32_nodes`` (name regexes) and the
    out-of-range nodes kept fp32, and fp32 graph I/O; tensors held in memory (the caller saves
    it, with external data past the threshold). :func:`convert_to_file` writes it instead, never
    holding its tensors."""
    fp32_path = Path(fp32_path)
    with tempfile.TemporaryDirectory(prefix=".fp16-", dir=fp32_path.parent) as work:
        converted, data_dir = _rewrite(fp32_path, calibration, fp32_nodes, Path(work))
        _read_tensors(converted, data_dir)
    _finish(converted)
    check_full(converted, f"fp16 conversion of {fp32_path.name}")
    return converted


def convert_to_file(fp32_path: Path, out_path: Path, calibration: dict[str, np.ndarray],
                    fp32_nodes: tuple[str, ...] = FP32_NODES, external_data_threshold: int | None = None) -> list[str]:
    """:func:`convert`, the graph written to ``out_path`` (``onnx_files.save_graph``: external data
    past the threshold, probed in ONNX Runtime) with its fp16 tensors converted one at a time
    straight into a data file: the converted graph's tensors are never all in memory (ViT-bigG-14's
    fp16 save was killed at 18.9 GB on a 24 GB machine when they were). Returns the data files
    written beside the graph."""
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".fp16-", dir=out_path.parent) as work:
        converted, data_dir = _rewrite(fp32_path, calibration, fp32_nodes, Path(work))
        # the converted tensors written one at a time into the new graph's data file
        write_external_tensors(converted, data_dir, Path(work) / "fp16.onnx.data", convert=_converted_bytes)
        _finish(converted)
        written = save_graph(converted, out_path, external_data_threshold, data_dir=Path(work))
    del converted
    release_freed_memory()
    check_full(out_path, f"fp16 conversion of {fp32_path.name}")
    return written


@contextmanager
def _truncation_warnings_silenced() -> Iterator[None]:
    """The library warns for each value under 1e-7 ("will be truncated"): its documented rule."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will be truncated to.*", category=UserWarning)
        yield


def _to_float16(array: np.ndarray) -> np.ndarray:
    with _truncation_warnings_silenced():
        return _float16_module().convert_np_to_float16(array, max_finite_val=FP16_MAX).astype("<f2")


def _float16_module():
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise DependencyError(
            "the fp16 export needs onnxconverter-common: pip install 'transmiter-deploy[fp16]' "
            "(or export without fp16)") from exc
    return float16


def _rewrite(fp32_path: Path, calibration: dict[str, np.ndarray], fp32_nodes: tuple[str, ...],
             work: Path) -> tuple[onnx.ModelProto, Path]:
    """Passes 1-3 on the structure: the converted graph, its tensors still external fp32 bytes
    (relative to the directory returned, ``work`` or the fp32 graph's own)."""
    float16 = _float16_module()

    structure, data_dir = weights_apart(fp32_path, work)
    named = {node.name for node in structure.graph.node
             if any(re.match(pattern, node.name) for pattern in fp32_nodes)}
    blocked = named | out_of_range_nodes(structure, data_dir, calibration)
    blocked |= {node.name for node in structure.graph.node if node.op_type in float16.DEFAULT_OP_BLOCK_LIST}
    blocked |= shape_arithmetic_nodes(structure)
    _split_shared_initializers(structure, blocked)
    # onnxslim can leave two value_info entries for one tensor, and the rewrite retypes only the
    # first: shape inference (run by the rewrite) lists each tensor once
    del structure.graph.value_info[:]
    fp32_outputs = [output.name for output in structure.graph.output
                    if output.type.tensor_type.elem_type == TensorProto.FLOAT]
    # the library clamps to +-1e4 by default; fp16 holds up to 65504, and the readers of larger
    # initialisers are blocked above, so nothing is clamped (small initialisers held in the graph
    # are converted here)
    with _truncation_warnings_silenced():
        try:
            converted = float16.convert_float_to_float16(
                structure, keep_io_types=True, node_block_list=sorted(blocked),
                op_block_list=float16.DEFAULT_OP_BLOCK_LIST, max_finite_val=FP16_MAX)
        except ValueError as exc:  # "already converted to float16"
            raise InputError(f"{fp32_path} cannot be converted to fp16: {str(exc).splitlines()[0]}") from exc
    _restore_fp32_outputs(converted, fp32_outputs)
    return converted, data_dir


SHAPE_SOURCES = ("Shape", "Size")


def shape_arithmetic_nodes(model: onnx.ModelProto) -> set[str]:
    """The nodes that compute from tensor shapes (and constants) alone, never from the data: kept
    fp32. The converter retypes such a node's float constant to fp16 but not the ``Cast(to=float)``
    of a shape that meets it, which leaves a node with mixed input types (a graph onnx's checker
    refuses); PyTorch's attention scale ``1 / sqrt(head_dim)``, computed from the query's shape
    where the shape is not static (MobileCLIP's attention), is one. Blocked, they stay fp32 and
    the converter casts their result where it meets fp16 data."""
    data = {value.name for value in model.graph.input}
    from_shapes: set[str] = set()
    shape_nodes: set[str] = set()
    for node in model.graph.node:  # topological order (onnx requires it)
        if node.op_type in SHAPE_SOURCES:
            from_shapes.update(node.output)
            continue
        inputs = [name for name in node.input if name]
        if any(name in data for name in inputs):
            data.update(node.output)
        elif any(name in from_shapes for name in inputs):
            from_shapes.update(node.output)
            shape_nodes.add(node.name)
    return shape_nodes


def _finish(converted: onnx.ModelProto) -> None:
    """What every converted graph gets after the rewrite, on its structure."""
    # the rewrite leaves stale entries (a blocked node's output typed fp16 where a Cast now makes
    # it): value types are derived again by whoever needs them (checker, bank composition, runtimes)
    del converted.graph.value_info[:]
    # ONNX Runtime's default CPU optimiser segfaults on fp16 Transpose -> MatMul chains
    # (consumer_safety.py): the rewrite keeps every value and lets default sessions load the graph
    move_transposes_after_matmuls(converted)


def _read_array(tensor: TensorProto, data_dir: Path) -> np.ndarray:
    """An external fp32 tensor's values, read alone from its data file."""
    info = external_info(tensor)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return np.fromfile(data_dir / info["location"], dtype="<f4", count=count, offset=int(info.get("offset", 0)))


def _float_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model)  # tensors are external: the structure alone
    values = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    return {value.name: value for value in values if value.type.tensor_type.elem_type == TensorProto.FLOAT}


def _estimated_bytes(value: onnx.ValueInfoProto, batch: int) -> int:
    """A tensor's size at the calibration batch; a dimension shape inference left open counts as
    the batch (the only symbolic axis of the toolkit's graphs), an unknown rank as a large tensor."""
    if not value.type.tensor_type.HasField("shape"):
        return PROBE_BUDGET_BYTES // 8
    size = 4
    for dim in value.type.tensor_type.shape.dim:
        size *= dim.dim_value if dim.HasField("dim_value") else batch
    return size


def _probe_groups(names: list[str], sizes: dict[str, int]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > PROBE_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    return [group for group in groups if group]


def value_ranges(structure: onnx.ModelProto, data_dir: Path, calibration: dict[str, np.ndarray]) -> dict[str, float]:
    """max |x| of every fp32 graph input and node output on ``calibration`` (inf where not
    finite), computed by ONNX Runtime in groups of ``PROBE_BUDGET_BYTES`` of outputs."""
    import onnxruntime as ort

    values = _float_values(structure)
    ranges = {name: _abs_max(array) for name, array in calibration.items()}
    outputs = [name for node in structure.graph.node if node.op_type != "Constant"
               for name in node.output if name in values]
    batch = max((array.shape[0] for array in calibration.values() if array.ndim), default=1)
    sizes = {name: _estimated_bytes(values[name], batch) for name in outputs}
    options = ort.SessionOptions()
    # exactly the nodes of the graph (no fusion hides a tensor), no packed copies of the weights
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # each group's activations returned, not pooled for the next
    for group in _probe_groups(outputs, sizes):
        probe = onnx.ModelProto()
        probe.CopyFrom(structure)  # tensors are references: the structure is small
        del probe.graph.output[:]
        probe.graph.output.extend(values[name] for name in group)
        # beside the data file: external data locations are relative, and ONNX Runtime
        # refuses a location that leaves the graph's directory
        path = data_dir / f".fp16-probe-{uuid.uuid4().hex}.onnx"
        try:
            onnx.save_model(probe, str(path))
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            results = session.run(group, calibration)
        finally:
            path.unlink(missing_ok=True)
        ranges.update({name: _abs_max(result) for name, result in zip(group, results)})
        del session, results
        release_freed_memory()  # each group's session holds the weights: one at a time
    return ranges


def _abs_max(array: np.ndarray) -> float:
    if array.size == 0:
        return 0.0
    if not np.isfinite(array).all():
        return float("inf")
    return float(np.abs(array).max())


def out_of_range_nodes(structure: onnx.ModelProto, data_dir: Path, calibration: dict[str, np.ndarray]) -> set[str]:
    """Nodes fp16 cannot hold, by AutoCast's two range rules: an input or output past
    ``DATA_MAX`` on the calibration images, or an fp32 initialiser past fp16's largest value."""
    ranges = value_ranges(structure, data_dir, calibration)
    too_large = {tensor.name for tensor in structure.graph.initializer
                 if tensor.data_type == TensorProto.FLOAT and _initializer_abs_max(tensor, data_dir) > FP16_MAX}
    return {node.name for node in structure.graph.node if node.op_type != "Constant"
            and any(ranges.get(name, 0.0) > DATA_MAX or name in too_large for name in (*node.input, *node.output))}


def _initializer_abs_max(tensor: TensorProto, data_dir: Path) -> float:
    if external_info(tensor) is not None:
        return _abs_max(_read_array(tensor, data_dir))
    return _abs_max(onnx.numpy_helper.to_array(tensor))


def _split_shared_initializers(model: onnx.ModelProto, blocked: set[str]) -> None:
    """An initialiser read by a blocked (fp32) node and by an fp16 node gets a twin for the
    blocked ones: onnxconverter-common leaves the inputs of blocked nodes fp32, which would hand
    the fp16 node an fp32 weight. The twin references the same bytes (no copy until read)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    readers: dict[str, set[bool]] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                readers[name].add(node.name in blocked)
    shared = {name for name, kinds in readers.items() if kinds == {True, False}}
    for name in sorted(shared):
        twin = model.graph.initializer.add()
        twin.CopyFrom(initializers[name])
        twin.name = f"{name}__fp32"
    for node in model.graph.node:
        if node.name in blocked:
            for index, name in enumerate(node.input):
                if name in shared:
                    node.input[index] = f"{name}__fp32"


def _restore_fp32_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """fp32 graph outputs that the rewrite retyped fp16 made fp32 again. onnxconverter-common keeps
    graph I/O fp32 (``keep_io_types``) except for an output that a blocked node produces: it casts
    that node's fp32 result to fp16 under the output's name (and marks the output fp16). The fp32
    result becomes the output again; the fp16 Cast stays, renamed, for any consumer inside."""
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    for output in graph.output:
        if output.name not in names or output.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        cast = producers[output.name]
        if cast.op_type != "Cast":  # not the pattern above: the checker would refuse the graph anyway
            raise InputError(f"fp16 conversion left output {output.name} in fp16 (produced by a {cast.op_type})")
        renamed = f"{output.name}__fp16"
        for node in graph.node:
            node.input[:] = [renamed if name == output.name else name for name in node.input]
        cast.output[0] = renamed
        graph.node.append(onnx.helper.make_node("Identity", [cast.input[0]], [output.name],
                                                name=f"{output.name}__fp32_output"))
        output.type.tensor_type.elem_type = TensorProto.FLOAT


def _converted_bytes(tensor: TensorProto, info: dict[str, str], data_dir: Path) -> bytes:
    """An external tensor's bytes as the converted graph stores them: the ones the rewrite made fp16
    (their bytes are still fp32) converted by onnxconverter-common's ``convert_np_to_float16``."""
    if tensor.data_type == TensorProto.FLOAT16:
        return _to_float16(_read_array(tensor, data_dir)).tobytes()
    with open(data_dir / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(external_length(tensor, info))


def _read_tensors(model: onnx.ModelProto, data_dir: Path) -> None:
    """Every external tensor read into the graph, one at a time."""
    for tensor in graph_tensors(model.graph):
        info = external_info(tensor)
        if info is None:
            continue
        raw = _converted_bytes(tensor, info, data_dir)
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        tensor.raw_data = raw
