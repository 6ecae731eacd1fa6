"""The fallback of a Q/DQ graph that fails its gate (deploy/qdq_fallback.py): nodes kept in fp32
compute on the fp32 tensors (a weight stored as int8: its dequantised values, still stored int8),
the most damaging quantisation ranks first, tries are bounded."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from transmiter_deploy.deploy.qdq_fallback import MAX_TRIES, keep_fp32, quantised_nodes, rank_by_sensitivity, tries

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 4)).astype(np.float32)


def _graphs(first_scale: float = 0.05):
    """``x -> MatMul(W1) -> MatMul(W2)`` in fp32, and quantised: activations through Q/DQ, the
    first weight as Q/DQ of the fp32 tensor, the second stored int8 per column (DQ only).
    ``first_scale``: the first activation's scale (large = a badly quantised node)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    fp32 = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                              helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
                             "fp32", [x], [y], [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")])
    w2_scale = (np.abs(W2).max(axis=0) / 127).astype(np.float32)
    w2_int8 = np.clip(np.round(W2 / w2_scale), -127, 127).astype(np.int8)
    constants = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(np.float32(first_scale), "s_x"),
                 numpy_helper.from_array(np.float32(0.02), "s_w1"), numpy_helper.from_array(np.float32(0.05), "s_h"),
                 numpy_helper.from_array(np.int8(0), "zero"), numpy_helper.from_array(w2_int8, "w2_q"),
                 numpy_helper.from_array(w2_scale, "s_w2"),
                 numpy_helper.from_array(np.zeros(4, np.int8), "zero_w2")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "zero"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "s_x", "zero"], ["x_dq"], name="dq_x"),
        helper.make_node("QuantizeLinear", ["w1", "s_w1", "zero"], ["w1_q"], name="q_w1"),
        helper.make_node("DequantizeLinear", ["w1_q", "s_w1", "zero"], ["w1_dq"], name="dq_w1"),
        helper.make_node("MatMul", ["x_dq", "w1_dq"], ["h"], name="mm1"),
        helper.make_node("QuantizeLinear", ["h", "s_h", "zero"], ["h_q"], name="q_h"),
        helper.make_node("DequantizeLinear", ["h_q", "s_h", "zero"], ["h_dq"], name="dq_h"),
        helper.make_node("DequantizeLinear", ["w2_q", "s_w2", "zero_w2"], ["w2_dq"], name="dq_w2", axis=1),
        helper.make_node("MatMul", ["h_dq", "w2_dq"], ["y"], name="mm2"),
    ]
    quantised = helper.make_graph(nodes, "qdq", [x], [y], constants)
    make = lambda graph: helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # noqa: E731
    return make(fp32), make(quantised)


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = RNG.standard_normal((16, 8)).astype(np.float32)


def test_every_node_kept_in_fp32_computes_the_fp32_graph_and_the_unused_qdq_nodes_go():
    fp32, quantised = _graphs()
    assert quantised_nodes(quantised) == ["mm1", "mm2"]
    both = keep_fp32(quantised, ["mm1", "mm2"])
    onnx.checker.check_model(both, full_check=True)
    assert quantised_nodes(both) == []
    # every Q/DQ pair was left unread; a weight stored as int8 has no fp32 original left and keeps its
    # DequantizeLinear (a fp32 copy would hold the same values at four times the bytes)
    assert sorted(node.op_type for node in both.graph.node) == ["DequantizeLinear", "MatMul", "MatMul"]
    assert next(t for t in both.graph.initializer if t.name == "w2_q").data_type == TensorProto.INT8
    w2_dq = numpy_helper.to_array(next(t for t in quantised.graph.initializer if t.name == "w2_q")).astype(np.float32)
    w2_dq = w2_dq * numpy_helper.to_array(next(t for t in quantised.graph.initializer if t.name == "s_w2"))
    np.testing.assert_allclose(_run(both, X), (X @ W1) @ w2_dq, rtol=1e-5, atol=1e-5)
    assert np.abs(_run(quantised, X) - _run(fp32, X)).max() > 1e-2  # the quantised graph really differs


def test_one_node_in_fp32_leaves_the_others_quantisation_as_it_was():
    fp32, quantised = _graphs()
    first = keep_fp32(quantised, ["mm1"])
    assert quantised_nodes(first) == ["mm2"]
    kept = {node.name for node in first.graph.node}
    assert {"q_h", "dq_h", "dq_w2"} <= kept and not {"q_x", "dq_x", "q_w1", "dq_w1"} & kept
    assert len(quantised.graph.node) == 9  # the input graph is not changed


def test_the_badly_quantised_node_ranks_first_and_tries_are_bounded():
    fp32, quantised = _graphs(first_scale=0.5)  # the input's 0.5 steps: most of x's detail lost
    reference = _run(fp32, X)
    ranking = rank_by_sensitivity(quantised, lambda graph: _run(graph, X), reference)
    assert [name for name, _ in ranking] == ["mm1", "mm2"] and ranking[0][1] > ranking[1][1] > 0
    assert tries(61) == [1, 2, 4, 8, 15] and tries(2) == [1] and tries(8) == [1, 2]
    assert tries(10_000) == [1, 2, 4, 8, 2500] and len(tries(10_000)) == MAX_TRIES


@pytest.mark.parametrize("count", [1, 3, 4, 100])
def test_a_try_never_keeps_more_than_a_quarter_of_the_nodes(count):
    assert all(size <= max(1, count // 4) for size in tries(count))
