"""Value-preserving ONNX rewrites that keep the toolkit's graphs loadable by standard consumers.

Every graph the toolkit ships must load and run in ONNX Runtime, Polygraphy and Triton with
their *default* settings, not only in the toolkit's own sessions. One known crash shapes the
rewrite here:

**ONNX Runtime 1.24/1.25 on x86-64 segfaults loading AutoCast fp16 transformers at
ORT_ENABLE_ALL** (measured on 1.24.4 with the demo's
``model_fp16.onnx`` and with ViT graphs). The CPU provider has no fp16 MatMul, so
``InsertCastTransformer`` puts a Cast(fp16 -> fp32) between each fp16 producer and its MatMul.
Where that producer is a Transpose, ``MatmulTransposeFusion`` swaps the Cast and the Transpose
to fuse the Transpose into a FusedMatMul, and the level-3 ``NchwcTransformer`` then dereferences
the operator schema of a node that has none yet (the diagnosis in #28392 and its proposed fix,
onnxruntime PR #29194). Measured here: disabling either of the two passes avoids the crash, and
a delta-debugged 19-node piece of the demo's graph still crashes. A user's session disables
neither, so the graph itself must not contain ``Transpose -> [Cast] -> MatMul``.

The rewrite: where the Transpose keeps the last axis in place and the MatMul's other operand is
a matrix (2-D, so it broadcasts over every leading axis), ``MatMul(Transpose(X), W)`` is
``Transpose(MatMul(X, W))`` with the same permutation: every output element is the same dot
product of the same operands in the same precision (only a GEMM kernel's accumulation order can
differ: on the demo's fp16 graph the logits moved by at most 3.5e-3, top-1 unchanged). torch's
seq-first ``nn.MultiheadAttention`` (open_clip's ViT blocks) writes exactly this pattern for the
packed input projection. A Cast between the two moves before the MatMul with it; a Transpose
with other consumers stays for them.

Written here, not taken from a library: onnxslim, which the export already runs, leaves the
pattern in place (measured: the demo graph keeps its 317 nodes and its fp16 conversion still
crashes), and the rule exists only because of a crash in one consumer.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper


def _initializer_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    return {tensor.name: len(tensor.dims) for tensor in graph.initializer}


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(helper.get_attribute_value(attribute))
    return None  # no perm: reverses every axis, so the last one moves (unless rank 1)


def move_transposes_after_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ``Transpose -> [Cast ->] MatMul`` (the Transpose feeding the
    MatMul's first operand) whose permutation keeps the last axis and whose second operand is a
    2-D initializer into ``[Cast ->] MatMul -> Transpose``; returns how many were rewritten.
    Node names are kept (the MatMul's), so name-based precision rules still apply to them."""
    graph = model.graph
    ranks = _initializer_ranks(graph)
    graph_outputs = {output.name for output in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producers[name] = node

    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes taking its place
    count = 0
    stale: set[str] = set()  # tensors whose shape changes (their value_info is dropped)
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        if ranks.get(matmul.input[1]) != 2:
            continue
        cast = producers.get(matmul.input[0])
        transpose = cast
        if cast is not None and cast.op_type == "Cast":
            if len(consumers[cast.output[0]]) != 1 or cast.output[0] in graph_outputs:
                continue
            transpose = producers.get(cast.input[0])
        else:
            cast = None
        if transpose is None or transpose.op_type != "Transpose":
            continue
        perm = _perm(transpose)
        if perm is None or len(perm) < 2 or perm[-1] != len(perm) - 1:
            continue
        source = transpose.input[0]
        nodes = []
        if cast is not None:  # the Cast now converts the untransposed tensor
            moved = f"{cast.output[0]}/before_transpose"
            nodes.append(helper.make_node("Cast", [source], [moved], name=cast.name,
                                          to=helper.get_attribute_value(cast.attribute[0])))
            source = moved
        product = f"{matmul.output[0]}/before_transpose"
        nodes.append(helper.make_node("MatMul", [source, matmul.input[1]], [product], name=matmul.name))
        nodes.append(helper.make_node("Transpose", [product], [matmul.output[0]], name=f"{matmul.name}/transpose",
                                      perm=perm))
        replaced[id(matmul)] = nodes
        count += 1
        if cast is not None:
            replaced[id(cast)] = []
            stale.add(cast.output[0])
        if len(consumers[transpose.output[0]]) == 1 and transpose.output[0] not in graph_outputs:
            replaced[id(transpose)] = []

    if not count:
        return 0
    rewritten = []
    for node in graph.node:  # replacements take the MatMul's place: still topologically sorted
        rewritten.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(rewritten)
    kept = [info for info in graph.value_info if info.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return count
