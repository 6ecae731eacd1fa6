"""The accuracy-driven fallback of a Q/DQ graph that fails its gate: the most sensitive quantised
nodes are kept in fp32 until the gate holds, within a bounded number of tries.

A node of a Q/DQ graph computes in int8 because its inputs pass QuantizeLinear -> DequantizeLinear
(activations, and weights stored in fp32); a weight stored as int8 has a DequantizeLinear alone.
Keeping a node in fp32 is exact graph surgery: each input behind a Q/DQ pair is taken from before
the pair (the fp32 tensor), with every other node's quantisation, calibrated scales included,
unchanged. A weight stored as int8 keeps its DequantizeLinear: its fp32 original no longer exists,
so a fp32 copy would hold the very values the DequantizeLinear computes, at four times the bytes;
with its activations in fp32 the node computes in fp32 on those values. So one calibration serves
every try, and no quantiser runs again.

Sensitivity, measured on the first ``RANKING_IMAGES`` calibration images (never on the gate's
images), in ONNX Runtime's default session (its integer kernels, as the gate runs): for each
quantised node alone, how much keeping it in fp32 reduces the mean absolute difference between
the graph's logits and the fp32 graph's. Most sensitive first, the tries keep 1, 2, 4, ... nodes
in fp32 and last a quarter of the quantised nodes, at most ``MAX_TRIES`` tries and never more than
that quarter (a graph that needs more is not an int8 graph: the gate fails, exit 4).

Why measured this way: a gate on a few dozen labelled images fails on a single flipped
prediction (1 of 32 base images is 3.1 points), and which near-tie flips depends on the CPU's
integer kernels (ONNX Runtime's AVX2 and AVX-512 VNNI paths round differently). The logit error
on the calibration images is continuous, so it ranks nodes where agreement alone would tie.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

MAX_TRIES = 5
MAX_SHARE = 0.25  # of the quantised nodes, at most, kept in fp32
# calibration images the ranking runs on (at most): on the small demo graph 32 images took 20 s
# against 33 s for 128 (a session per node), but ranked so differently that 8 nodes in fp32 no
# longer passed the gate where they did with 128
RANKING_IMAGES = 128


def quantised_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that read a QuantizeLinear -> DequantizeLinear pair's output (the nodes
    computing in int8: a weight's DequantizeLinear alone does not make a node integer), in graph
    order."""
    quantised = {node.output[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    requantised = {node.output[0] for node in model.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in quantised}
    return [node.name for node in model.graph.node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and requantised & set(node.input)]


def keep_fp32(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the named nodes read their inputs from before quantisation;
    the Q/DQ nodes nothing reads any more are removed."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    producers = {output: node for node in graph.node for output in node.output}
    chosen = set(names)
    for node in graph.node:
        if node.name not in chosen:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    _remove_unused(graph)
    return result


def _remove_unused(graph: onnx.GraphProto) -> None:
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    nodes = list(reversed(kept))
    del graph.node[:]
    graph.node.extend(nodes)
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def rank_by_sensitivity(model: onnx.ModelProto, run: Callable[[onnx.ModelProto], np.ndarray],
                        reference: np.ndarray) -> list[tuple[str, float]]:
    """Each quantised node with how much keeping it alone in fp32 lowers the mean absolute logit
    difference from ``reference`` (``run``: a graph's logits on the calibration images); most
    sensitive first."""
    baseline = float(np.abs(run(model) - reference).mean())
    gains = [(name, baseline - float(np.abs(run(keep_fp32(model, [name])) - reference).mean()))
             for name in quantised_nodes(model)]
    return sorted(gains, key=lambda item: -item[1])


def tries(count: int) -> list[int]:
    """How many of ``count`` quantised nodes each try keeps in fp32: 1, 2, 4, ..., and last the
    bound itself (a quarter of the nodes), at most ``MAX_TRIES`` tries."""
    limit = max(1, int(count * MAX_SHARE))
    sizes, size = [], 1
    while size < limit and len(sizes) < MAX_TRIES - 1:
        sizes.append(size)
        size *= 2
    return sizes + [limit]
