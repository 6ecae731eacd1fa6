"""Multiply-accumulates counted from an exported ONNX graph itself.

Every MatMul, Gemm and Conv is costed from the inferred shapes at a fixed
batch size and attributed to a component by its node name: nodes under
``/visual/`` are the backbone, everything else is the head and adapter.
Counting the graph (not the PyTorch module) is what proves what the deployed
artifact costs.

Only the structure is needed (shapes, not weights): :func:`count_macs_file` reads a graph
without its external data, so a graph past 2 GiB is counted at the memory of its structure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import shape_inference

from ..errors import VerificationError

COSTED_OPS = ("MatMul", "Gemm", "Conv")


def _with_fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del fixed.graph.value_info[:]
    return shape_inference.infer_shapes(fixed, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def component_of(node_name: str) -> str:
    return "backbone" if node_name.startswith("/visual/") else "head+adapter"


def count_macs_file(path: Path, batch: int = 1) -> dict[str, int]:
    """:func:`count_macs` of the graph at ``path``, read without its external data (tensors
    under 1 KB, which shape inference may read, stay inside the graph: onnx_files.save_graph)."""
    from ..runtimes.onnx_files import graph_structure

    return count_macs(graph_structure(Path(path)), batch)


def _costed_shapes_known(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> bool:
    return all(shapes.get(name) and None not in shapes[name]
               for node in model.graph.node if node.op_type in COSTED_OPS
               for name in (node.output[0], node.input[0], node.input[1]))


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes from ONNX Runtime's symbolic shape inference, or none where it fails. onnx's own
    inference does not propagate values through ``Where``, so a shape built as ``expand(B, -1,
    -1)`` stays unknown (SigLIP's attention pool expands its latent query that way); the symbolic
    one evaluates such shape arithmetic."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from ..runtimes.onnx_files import external_weights_as_inputs

    # a graph read without its external data (count_macs_file, graphs past 2 GiB): the inference
    # would read each initialiser's values; the external ones become inputs of their shape instead,
    # in a copy (a graph whose weights are inline is not copied: the inference copies it itself)
    structure = model
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
        structure = onnx.ModelProto()
        structure.CopyFrom(model)
        external_weights_as_inputs(structure)
    try:
        return _shapes(SymbolicShapeInference.infer_shapes(structure, auto_merge=True))
    except Exception:  # noqa: BLE001 - a third-party inference that may fail on any op; the caller reports
        return {}


def count_macs(model: onnx.ModelProto, batch: int = 1) -> dict[str, int]:
    """MACs per component, e.g. ``{"backbone": ..., "head+adapter": ..., "total": ...}``."""
    inferred = _with_fixed_batch(model, batch)
    shapes = _shapes(inferred)
    if not _costed_shapes_known(inferred, shapes):
        shapes.update({name: dims for name, dims in _symbolic_shapes(inferred).items() if None not in dims})
    totals: dict[str, int] = defaultdict(int)
    for node in inferred.graph.node:
        if node.op_type not in COSTED_OPS:
            continue
        out = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1])
        if not out or not a or not b or None in out or None in a or None in b:
            raise VerificationError(f"cannot infer the shapes of {node.op_type} node '{node.name}' to count its cost")
        if node.op_type == "MatMul":
            macs = math.prod(out) * a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            macs = math.prod(out) * (a[0] if trans_a else a[-1])
        else:  # Conv: weight (C_out, C_in / groups, k...)
            macs = math.prod(out) * math.prod(b[1:])
        totals[component_of(node.name)] += macs
    totals["total"] = sum(totals.values())
    return dict(totals)
