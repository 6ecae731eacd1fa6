"""Every graph the toolkit writes loads and runs in the standard consumers with their default
settings: ONNX Runtime at each optimisation level (in a child process, so a crash fails the test
instead of killing the suite), Polygraphy's ``run --onnxrt --validate``; the C++ backend is in
tests/cpp/. Also the rewrite that makes AutoCast's fp16 graphs loadable (deploy/consumer_safety.py)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from transmiter_deploy.deploy.consumer_safety import move_transposes_after_matmuls
from transmiter_deploy.errors import VerificationError
from transmiter_deploy.runtimes.load_probe import LEVELS, probe
from transmiter_deploy.runtimes.onnx_files import require_loadable

from conftest import polygraphy_validate

# ONNX Runtime versions measured to segfault on Transpose -> MatMul in fp16 (onnxruntime #28392)
CRASHING_ORT = ("1.24.4",)


def _graphs(root: Path) -> list[Path]:
    graphs = sorted(root.rglob("*.onnx"))
    assert graphs, f"no graphs under {root}"
    return graphs


@pytest.fixture(scope="module")
def every_graph(demo_export, demo_int8_export, demo_bank_export) -> dict[str, list[Path]]:
    """Each export kind's graphs: single task (fp32, fp16), with int8, and the bank."""
    _, outcome = demo_export
    int8_out, _ = demo_int8_export
    return {"single": _graphs(outcome.export_dir), "int8": _graphs(int8_out / "onnx"),
            "bank": _graphs(demo_bank_export / "onnx")}


@pytest.mark.parametrize("kind", ["single", "int8", "bank"])
def test_every_exported_graph_loads_and_runs_at_every_optimisation_level(every_graph, kind):
    graphs = every_graph[kind]
    if kind == "int8":
        assert any(p.name == "model_int8.onnx" for p in graphs)
    if kind == "bank":
        assert {"model_fp16.onnx", "backbone_fp16.onnx", "head_fp16.onnx"} <= {p.name for p in graphs}
    assert any("fp16" in p.name for p in graphs)
    assert probe(graphs, LEVELS) is None


@pytest.mark.parametrize("kind", ["single", "bank"])
def test_polygraphy_validates_every_exported_graph_with_onnxruntime(every_graph, kind):
    for graph in every_graph[kind]:
        polygraphy_validate(graph)


def test_default_options_give_the_same_fp16_outputs_as_no_optimisation(demo_export):
    """The toolkit's own sessions no longer switch the optimiser off for fp16: what they check is
    what a user's default session computes, to fp16 rounding."""
    _, outcome = demo_export
    graph = outcome.export_dir / "model_fp16.onnx"
    require_loadable([graph])
    shape = [d.dim_value for d in onnx.load(graph, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]]
    pixels = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    outputs = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        outputs[level] = session.run(None, {"pixel_values": pixels})[0]
    assert np.isfinite(outputs["ORT_ENABLE_ALL"]).all()
    assert (outputs["ORT_ENABLE_ALL"].argmax(1) == outputs["ORT_DISABLE_ALL"].argmax(1)).all()
    assert np.abs(outputs["ORT_ENABLE_ALL"] - outputs["ORT_DISABLE_ALL"]).max() <= 0.05


# --- the rewrite --------------------------------------------------------------------------------

def _attention_input_projection(dtype: int, with_cast: bool, extra_consumer: bool, perm=(1, 0, 2),
                                shape=("L", "N", 8), width: int = 12, seed: int = 0) -> onnx.ModelProto:
    """What torch's seq-first nn.MultiheadAttention exports for the packed input projection:
    Transpose -> MatMul with a matrix, in ``dtype``; ``with_cast``: AutoCast's Cast in between."""
    rng = np.random.default_rng(seed)
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    weight = numpy_helper.from_array((rng.standard_normal((shape[-1], width)) / 4).astype(
        np.float32 if with_cast else np_dtype), "weight")
    nodes = [helper.make_node("Cast", ["x"], ["x_low"], to=dtype),
             helper.make_node("Transpose", ["x_low"], ["t"], perm=list(perm))]
    operand = "t"
    if with_cast:
        nodes.append(helper.make_node("Cast", ["t"], ["t32"], to=TensorProto.FLOAT))
        operand = "t32"
    nodes += [helper.make_node("MatMul", [operand, "weight"], ["y_low"], name="/attn/MatMul"),
              helper.make_node("Cast", ["y_low"], ["y"], to=TensorProto.FLOAT)]
    transposed = [shape[axis] for axis in perm]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*transposed[:-1], width])]
    if extra_consumer:
        nodes.append(helper.make_node("Cast", ["t"], ["t_out"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("t_out", TensorProto.FLOAT, transposed))
    graph = helper.make_graph(nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              outputs, [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.skipif(ort.__version__ not in CRASHING_ORT, reason=f"the crash is measured on ONNX Runtime {CRASHING_ORT}")
def test_the_fp16_transpose_matmul_crash_is_caught_by_the_probe_and_removed_by_the_rewrite(tmp_path):
    model = _attention_input_projection(TensorProto.FLOAT16, with_cast=False, extra_consumer=False, shape=("L", "N", 8))
    crashing = tmp_path / "crashing.onnx"
    onnx.save(model, crashing)
    failure = probe([crashing], ("ORT_ENABLE_ALL",))
    if failure is None:  # the bug needs a bigger pattern on this host: use the demo's own graph
        pytest.skip("this minimal pattern loads here")
    assert "crashed loading" in failure and "ORT_ENABLE_ALL" in failure and "SIGSEGV" in failure
    with pytest.raises(VerificationError, match="crashing.onnx at ORT_ENABLE_ALL"):
        require_loadable([crashing], ("ORT_ENABLE_ALL",))
    assert move_transposes_after_matmuls(model) == 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, fixed)
    assert probe([fixed]) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank=st.integers(2, 5), data=st.data(), with_cast=st.booleans(), extra_consumer=st.booleans(),
       seed=st.integers(0, 2**16))
def test_the_rewrite_keeps_every_value(rank, data, with_cast, extra_consumer, seed):
    leading = data.draw(st.permutations(list(range(rank - 1))))
    perm = [*leading, rank - 1]
    dims = data.draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1))
    shape = [*dims, 8]
    model = _attention_input_projection(TensorProto.FLOAT, with_cast, extra_consumer, perm, shape, seed=seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    before = ReferenceEvaluator(model).run(None, {"x": x})
    assert move_transposes_after_matmuls(model) == 1
    onnx.checker.check_model(model, full_check=True)
    after = ReferenceEvaluator(model).run(None, {"x": x})
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
    ops = [node.op_type for node in model.graph.node]
    assert ops.index("MatMul") < max(i for i, op in enumerate(ops) if op == "Transpose")  # the Transpose moved after
    assert ops.count("Transpose") == (2 if extra_consumer else 1)  # kept for its other consumer


@pytest.mark.parametrize("perm, weight_rank", [((0, 2, 1), 2), ((1, 0, 2), 3)])
def test_the_rewrite_leaves_what_it_cannot_prove_equal(perm, weight_rank):
    """A Transpose that moves the last axis, or a MatMul whose other operand is not a matrix, is
    not the same product with the Transpose after it: left alone."""
    model = _attention_input_projection(TensorProto.FLOAT, False, False, perm, (3, 3, 3), width=3)
    if weight_rank == 3:
        weight = model.graph.initializer[0]
        array = np.stack([numpy_helper.to_array(weight)] * 3)
        weight.CopyFrom(numpy_helper.from_array(array, "weight"))
    before = model.SerializeToString()
    assert move_transposes_after_matmuls(model) == 0
    assert model.SerializeToString() == before
