"""Compact heads for the bank sweep: ONNX Runtime's weight-only quantiser on each head's MLP.

``MatMulNBitsQuantizer`` is applied to the MLP's two big MatMuls of each head (the exported Gemms
are first rewritten as MatMul + Add, which is all the quantiser takes); the push, the pull and
every statistics node (``/stats/``, ``/normalise/``, ``/destandardise/``) stay fp32, which is
checked on the graph. The result holds ``com.microsoft`` ``MatMulNBits`` nodes: a graph for ONNX
Runtime, which other runtimes may be unable to load (the sweep then records why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..deploy.fusion import FP32_NODES
from ..errors import DependencyError, VerificationError
from .bank_graphs import BankGraphs

MLP_NODE = re.compile(r".*/blocks\.\d+/fc\d/")  # the residual MLP's linear layers: the big weights


@dataclass(frozen=True)
class Compact:
    """One setting of ONNX Runtime's weight-only quantiser for the heads' MLP MatMuls."""

    name: str
    bits: int
    block_size: int
    accuracy_level: int | None  # None/0: fp32 arithmetic on dequantised weights; 4: int8 activations
    description: str
    symmetric: bool = True


COMPACT = {c.name: c for c in (
    Compact("q8", 8, 128, None, "int8 weights (MatMulNBits, blocks of 128), fp32 arithmetic"),
    Compact("q8i", 8, 128, 4, "int8 weights, int8-quantised activations and int8 dot products (accuracy_level 4)"),
    Compact("q4", 4, 32, None, "int4 weights (blocks of 32), fp32 arithmetic"),
)}


def mlp_gemms_to_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP's ``Gemm(x, W, b, transB=1)`` nodes as ``MatMul(x, W^T)`` + ``Add(b)``: the
    weight-only quantiser takes MatMul nodes only. Exact (same products, same sums)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {init.name: init for init in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Gemm" or not MLP_NODE.match(node.name):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                or node.input[1] not in initializers:
            raise VerificationError(f"cannot rewrite Gemm node '{node.name}' ({attrs}) as MatMul + Add")
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        out.graph.initializer.remove(initializers[node.input[1]])
        transposed = numpy_helper.from_array(np.ascontiguousarray(weight), f"{node.input[1]}.kxn")
        out.graph.initializer.append(transposed)
        base = node.name.rsplit("/", 1)[0]
        product = f"{node.output[0]}.matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed.name], [product], name=f"{base}/MatMul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}/Add"))
        else:
            nodes[-1].output[0] = node.output[0]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _fp32_nodes(model: onnx.ModelProto) -> list[str]:
    patterns = [re.compile(p) for p in FP32_NODES]
    return [onnx.helper.printable_node(n) for n in model.graph.node if any(p.match(n.name) for p in patterns)]


def compact_head(model: onnx.ModelProto, setting: Compact) -> onnx.ModelProto:
    """``model`` (a head graph) with its MLP MatMuls' weights quantised by ONNX Runtime's
    ``MatMulNBitsQuantizer``; every other node unchanged (checked)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise DependencyError(f"compact heads need onnxruntime.quantization: {exc}") from exc
    import logging

    rewritten = mlp_gemms_to_matmuls(model)
    mlp = [n.name for n in rewritten.graph.node if n.op_type == "MatMul" and MLP_NODE.match(n.name)]
    if not mlp:
        raise VerificationError("the head graph has no MLP MatMul to quantise")
    others = [n.name for n in rewritten.graph.node if n.op_type == "MatMul" and n.name not in mlp]
    quantiser_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantiser_log.level
    quantiser_log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantiser = MatMulNBitsQuantizer(rewritten, bits=setting.bits, block_size=setting.block_size,
                                         is_symmetric=setting.symmetric, accuracy_level=setting.accuracy_level,
                                         nodes_to_exclude=others, op_types_to_quantize=("MatMul",))
        quantiser.process()
    finally:
        quantiser_log.setLevel(level)
    quantised = quantiser.model.model
    done = [n.name for n in quantised.graph.node if n.op_type == "MatMulNBits"]
    if len(done) != len(mlp):
        raise VerificationError(f"the quantiser replaced {len(done)} of the {len(mlp)} MLP MatMuls")
    if _fp32_nodes(quantised) != _fp32_nodes(model):
        raise VerificationError("the quantiser changed a statistics node (/stats/, /normalise/, /destandardise/)")
    return quantised


def compact_heads(graphs: BankGraphs, setting: Compact, count: int) -> list[tuple[str, onnx.ModelProto]]:
    """The first ``count`` heads of ``graphs`` in ``setting``, by task name."""
    return [(name, compact_head(head, setting)) for name, head in graphs.heads[:count]]
