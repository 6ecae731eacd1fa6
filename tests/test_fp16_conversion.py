"""The bounded-memory fp16 converter (deploy/precisions/fp16.py) on small hand-built graphs: which
nodes stay fp32 and why, I/O kept fp32, shared weights, the range pass in groups, external data."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from transmiter_deploy.runtimes.onnx_files import save_graph
from transmiter_deploy.deploy.precisions import fp16
from transmiter_deploy.runtimes.onnxruntime import ort_session, run_session

WIDTH = 64


def _graph(scale: float, shared: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Mul(scale) -> MatMul(W2) -> /stats/Mul(x2) -> y: with a large ``scale``
    the Mul's output and the second MatMul's input pass DATA_MAX. ``shared``: the last node (named
    like a statistic, so kept fp32 by name) reads W1 too, which the first (fp16) MatMul reads."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="/first/MatMul"),
             helper.make_node("Mul", ["h1", "scale"], ["h2"], name="/scale/Mul"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="/second/MatMul"),
             helper.make_node("MatMul" if shared else "Mul", ["h3", "w1" if shared else "two"], ["y"],
                              name="/stats/Last")]
    initializers = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                    numpy_helper.from_array(np.array(scale, np.float32), "scale"),
                    numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, WIDTH)).astype(np.float32)}


def _convert(tmp_path, model: onnx.ModelProto, threshold: int | None = None) -> onnx.ModelProto:
    save_graph(model, tmp_path / "g.onnx", external_data_threshold=threshold, probe=False)
    return fp16.convert(tmp_path / "g.onnx", _inputs(), fp32_nodes=(r"/stats/.*",))


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {tensor.name: tensor.data_type for tensor in model.graph.initializer}


def _run(model: onnx.ModelProto, tmp_path, name: str) -> np.ndarray:
    onnx.save(model, tmp_path / name)
    return run_session(ort_session(tmp_path / name), _inputs()["x"])


def test_in_range_graph_is_fp16_but_for_named_nodes_and_keeps_fp32_io(tmp_path):
    converted = _convert(tmp_path, _graph(scale=1.0))
    types = _initializer_types(converted)
    assert types["w1"] == types["w2"] == TensorProto.FLOAT16
    assert types["two"] == TensorProto.FLOAT  # read by /stats/Last only: kept fp32 by name
    graph = converted.graph
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [TensorProto.FLOAT] * 2
    expected = _run(_graph(scale=1.0), tmp_path, "fp32.onnx")
    result = _run(converted, tmp_path, "fp16.onnx")
    assert result.dtype == np.float32 and np.abs(result - expected).max() < 2e-2 * np.abs(expected).max()


def test_nodes_past_data_max_on_calibration_stay_fp32(tmp_path):
    structure = _graph(scale=1000.0)
    converted = _convert(tmp_path, structure)
    types = _initializer_types(converted)
    # the Mul's output passes 512 (its input does not): the Mul and the MatMul reading it stay fp32
    assert types["w1"] == TensorProto.FLOAT16
    assert types["w2"] == TensorProto.FLOAT and types["scale"] == TensorProto.FLOAT
    assert fp16.out_of_range_nodes(onnx.load(tmp_path / "g.onnx"), tmp_path, _inputs()) == {
        "/scale/Mul", "/second/MatMul", "/stats/Last"}
    expected = _run(structure, tmp_path, "fp32.onnx")
    assert np.abs(_run(converted, tmp_path, "fp16.onnx") - expected).max() < 1e-2 * np.abs(expected).max()


def test_range_pass_in_one_group_or_one_tensor_per_group_finds_the_same(tmp_path, monkeypatch):
    structure = _graph(scale=1000.0)
    onnx.save(structure, tmp_path / "g.onnx")
    whole = fp16.value_ranges(structure, tmp_path, _inputs())
    monkeypatch.setattr(fp16, "PROBE_BUDGET_BYTES", 1)
    assert fp16._probe_groups(["h1", "h2", "h3"], {"h1": 8, "h2": 8, "h3": 8}) == [["h1"], ["h2"], ["h3"]]
    assert fp16.value_ranges(structure, tmp_path, _inputs()) == whole
    assert whole["h2"] > fp16.DATA_MAX > whole["h1"]


def test_a_weight_read_by_an_fp32_and_an_fp16_node_gets_a_twin(tmp_path):
    converted = _convert(tmp_path, _graph(scale=1.0, shared=True))
    onnx.checker.check_model(converted, full_check=True)  # an fp16 MatMul handed an fp32 weight would fail here
    types = _initializer_types(converted)
    assert types["w1"] == TensorProto.FLOAT16 and types["w1__fp32"] == TensorProto.FLOAT
    expected = _run(_graph(scale=1.0, shared=True), tmp_path, "fp32.onnx")
    assert np.abs(_run(converted, tmp_path, "fp16.onnx") - expected).max() < 2e-2 * np.abs(expected).max()


def test_external_data_input_gives_the_same_graph_and_leaves_no_scratch_files(tmp_path):
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    inline = _convert(tmp_path / "inline", _graph(scale=1000.0))
    external = _convert(tmp_path / "external", _graph(scale=1000.0), threshold=0)
    assert (tmp_path / "external" / "g.onnx.data").exists()
    assert {t.name: t.raw_data for t in inline.graph.initializer} == {t.name: t.raw_data for t in external.graph.initializer}
    assert all(t.data_location != TensorProto.EXTERNAL for t in external.graph.initializer)  # held in memory
    for directory in ("inline", "external"):
        assert sorted(p.name for p in (tmp_path / directory).iterdir()) == sorted(
            ["g.onnx"] + (["g.onnx.data"] if directory == "external" else []))


@pytest.mark.parametrize("threshold", [0, None])
def test_convert_to_file_writes_the_graph_convert_makes(tmp_path, threshold):
    # what exports use: the converted tensors go to the file one at a time; the graph is the same,
    # with its tensors apart past the threshold and inline below it
    for name in ("in-memory", "to-file"):
        (tmp_path / name).mkdir()
        save_graph(_graph(scale=1000.0, shared=True), tmp_path / name / "g.onnx", external_data_threshold=0, probe=False)
    held = fp16.convert(tmp_path / "in-memory" / "g.onnx", _inputs(), fp32_nodes=(r"/stats/.*",))
    out = tmp_path / "to-file" / "g_fp16.onnx"
    written = fp16.convert_to_file(tmp_path / "to-file" / "g.onnx", out, _inputs(), fp32_nodes=(r"/stats/.*",),
                                   external_data_threshold=threshold)
    assert written == (["g_fp16.onnx.data"] if threshold == 0 else [])
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["g.onnx", "g.onnx.data", "g_fp16.onnx", *written])
    stored = onnx.load(str(out))  # external data read back from beside the graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in stored.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in held.graph.node]
    assert {t.name: (t.data_type, numpy_helper.to_array(t).tobytes()) for t in stored.graph.initializer} == {
        t.name: (t.data_type, numpy_helper.to_array(t).tobytes()) for t in held.graph.initializer}
    assert _initializer_types(stored)["w1__fp32"] == TensorProto.FLOAT  # the twin, as in memory
    np.testing.assert_array_equal(run_session(ort_session(out), _inputs()["x"]), _run(held, tmp_path, "held.onnx"))


def test_external_data_without_length_entries_converts(tmp_path):
    # the format leaves "length" optional: the TorchScript exporter, past 2 GiB, writes a file per
    # tensor and no lengths. The fp32 twin of a shared weight is copied by its shape, the fp16
    # weights converted by theirs
    onnx.save_model(_graph(scale=1000.0, shared=True), str(tmp_path / "g.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    structure = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    for tensor in structure.graph.initializer:
        kept = [(entry.key, entry.value) for entry in tensor.external_data if entry.key != "length"]
        del tensor.external_data[:]
        for key, value in kept:
            tensor.external_data.add(key=key, value=value)
    onnx.save_model(structure, str(tmp_path / "g.onnx"))
    out = tmp_path / "g_fp16.onnx"
    fp16.convert_to_file(tmp_path / "g.onnx", out, _inputs(), fp32_nodes=(r"/stats/.*",), external_data_threshold=0)
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "g.onnx")).graph.initializer}
    assert stored["w1"].dtype == np.float16 and stored["w2"].dtype == stored["w1__fp32"].dtype == np.float32
    for name, value in stored.items():  # each tensor whole, in the type the graph stores it in
        np.testing.assert_array_equal(value, original[name.removesuffix("__fp32")].astype(value.dtype))


def test_an_fp16_graph_is_refused(tmp_path):
    from transmiter_deploy.errors import InputError

    converted = _convert(tmp_path, _graph(scale=1.0))
    onnx.save(converted, tmp_path / "again.onnx")
    with pytest.raises(InputError, match="cannot be converted to fp16"):
        fp16.convert(tmp_path / "again.onnx", _inputs())
