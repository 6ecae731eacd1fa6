"""int8 (ModelOpt Q/DQ) added to the small demo export: calibrated on the recipe's own images,
gated on its labelled test images, refused cleanly when the calibration is broken or missing."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from transmiter_deploy.cli import main
from transmiter_deploy.deploy.parity import run_graph
from transmiter_deploy.errors import IntegrityError
from transmiter_deploy.pipeline.export import run_export
from transmiter_deploy.pipeline.recipe import load_recipe
from transmiter_deploy.runtimes import registry
from transmiter_deploy.runtimes.base import GraphInMemory
from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

from conftest import SMALL_DEMO_INT8, copy_export

INT8 = SMALL_DEMO_INT8


def copy_of(demo_export, tmp_path, recipe_text=INT8):
    return copy_export(demo_export, tmp_path, recipe_text)


@pytest.fixture(scope="module")
def int8_export(demo_int8_export):
    return demo_int8_export


@pytest.mark.precision("int8")
def test_int8_is_calibrated_gated_and_added_to_the_export(int8_export):
    out, outcome = int8_export
    ran = {step.name: step.status for step in outcome.steps}
    assert ran["onnx-int8"] == "ran" and ran["onnx"] == ran["extract"] == ran["cache-target-train"] == "skipped"
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["files"]["model_int8.onnx"]["precision"] == "int8-qdq"
    # ModelOpt quantises none of the head's GEMMs: no fp32 head under an int8 name
    assert "head_int8.onnx" not in manifest["files"] and not (out / "onnx" / "head_int8.onnx").exists()
    checks = json.loads((out / "onnx" / "parity.json").read_text())["checks"]
    assert "head_int8_vs_onnx_fp32" not in checks
    assert checks["onnx_int8_vs_torch_fp32"]["required"] is False  # reported: the accuracy gate decides
    assert manifest["calibration"]["int8"]["images"] == 128 and len(manifest["calibration"]["int8"]["fingerprint"]) == 64
    graph = onnx.load(out / "onnx" / "model_int8.onnx")
    assert sum(node.op_type == "QuantizeLinear" for node in graph.graph.node) > 10
    # weights stored as int8 behind a DequantizeLinear alone: no QuantizeLinear reads a constant
    constants = {tensor.name: tensor for tensor in graph.graph.initializer}
    assert not [n.name for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in constants]
    weights = [constants[n.input[0]] for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert len(weights) > 10 and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    size = (out / "onnx" / "model_int8.onnx").stat().st_size / (out / "onnx" / "model.onnx").stat().st_size
    kept = manifest.get("fp32_nodes_kept", {}).get("int8", [])
    print(f"model_int8.onnx / model.onnx: {size:.3f} of the bytes ({len(kept)} nodes kept in fp32)")
    # int8 weights are a quarter of fp32's, those of the nodes the fallback keeps in fp32 included
    # (their activations are fp32; the weights' fp32 originals no longer exist)
    assert size <= 0.35
    (gate,) = outcome.gates
    assert gate["passed"] and gate["labelled"] and gate["samples"] == 64
    # judged on accuracy (points and relative to fp32) per metric; agreement reported, not a criterion
    assert [c["criterion"] for c in gate["criteria"]] == [f"{metric} within 1.0 points and >= 99% of fp32"
                                                          for metric in ("base", "novel", "hm")]
    assert all(abs(c["value"]) <= 1.0 for c in gate["criteria"]) and 0 < gate["top1_agreement"] <= 1
    validated = {(row["candidate"], row["graph"]): row for row in outcome.validation}
    # the gate's runtime (ONNX Runtime CPU) within the int8 tolerance; other runtimes' integer
    # kernels round on their own side and are reported (docs/export.md)
    ort_int8 = validated["onnxruntime-cpu", "model_int8.onnx"]
    assert ort_int8["precision"] == "int8" and ort_int8["passed"]
    report = (out / "report.md").read_text()
    assert "## int8 accuracy gate (test images, 64 images): pass" in report
    plan = json.loads((out / "engines" / "model_int8.engine.json").read_text())
    assert plan["precision"] == "int8" and plan["onnx_sha256"] == manifest["files"]["model_int8.onnx"]["sha256"]
    # the statistics stay fp32: no Q/DQ around the head's normalisation, mean, sigma, de-standardisation
    assert not [n.name for n in graph.graph.node if n.op_type == "QuantizeLinear"
                and any(part in n.name for part in ("/normalise/", "/stats/", "/destandardise/"))]


def test_int8_weights_compute_as_the_qdq_pair_on_fp32_weights_did(demo_export):
    """The int8-weight graph (DequantizeLinear only) against the earlier form (fp32 weights behind
    QuantizeLinear -> DequantizeLinear), converted from the same graph on the same calibration:
    ONNX Runtime's logits agree within float rounding, at about a third of the bytes."""
    from transmiter_deploy.deploy.precisions.int8 import convert
    from transmiter_deploy.serving.deployment import Deployment

    _, outcome = demo_export
    images = sorted((outcome.out_dir / "data").glob("*/*/*.png"))
    with Deployment.open(outcome.export_dir, "onnxruntime-cpu", precision="fp32") as deployment:
        calibration, pixels = deployment.preprocess(images[:: len(images) // 32][:32]), deployment.preprocess(images[1:80:2])
    fp32 = outcome.export_dir / "model.onnx"
    graphs = {form: convert(fp32, {"pixel_values": calibration}, weights_int8=form == "int8") for form in ("fp32", "int8")}
    sizes = {form: graph.ByteSize() for form, graph in graphs.items()}
    logits = {form: run_graph(GraphInMemory(graph.SerializeToString(), "int8", f"{form}-weight graph"), pixels)
              for form, graph in graphs.items()}
    print(f"int8-weight graph: {sizes['int8'] / sizes['fp32']:.3f} of the Q/DQ graph's bytes; max abs "
          f"{np.abs(logits['int8'] - logits['fp32']).max():.2e} on logits up to {np.abs(logits['fp32']).max():.1f}")
    assert sizes["int8"] < 0.4 * sizes["fp32"]
    np.testing.assert_allclose(logits["int8"], logits["fp32"], rtol=0, atol=1e-5)


def test_a_broken_calibration_fails_the_gate_and_leaves_the_export_as_it_was(demo_export, tmp_path, capsys):
    constant = tmp_path / "grey"
    constant.mkdir()
    for i in range(40):  # one constant image, 40 times: activation ranges collapse
        Image.new("RGB", (48, 48), (128, 128, 128)).save(constant / f"{i:02d}.png")
    # without the fallback: with it, whether keeping a quarter of the nodes in fp32 rescues this graph
    # depends on the CPU's integer kernels (it did on an AVX-512 VNNI Xeon, not on an AVX2 EPYC)
    path, out = copy_of(demo_export, tmp_path, INT8.replace(
        "export: {", f"export: {{calibration: {{data: {constant}, fallback: false}}, "))
    before = (out / "onnx" / "manifest.json").read_bytes()
    status = main(["--quiet", "export", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 4 and err[-1].startswith("transmiter: error: int8 accuracy gate failed on test images")
    assert (out / "onnx" / "manifest.json").read_bytes() == before and not (out / "onnx" / "model_int8.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    (gate,) = report["gates"]
    assert not gate["passed"] and gate["top1_agreement"] < 0.99 and "fallback" not in gate
    assert "FAIL: the int8 graphs were not added" in (out / "report.md").read_text()
    assert {s["name"]: s["status"] for s in report["steps"]}["onnx-int8"] == "failed"


@pytest.mark.parametrize("change, message", [
    ("export: {calibration: {images: 16}, ", "export.calibration.images: 16 is below the minimum (32)"),
    ("export: {calibration: {minimum: 0}, ", "export.calibration.minimum: must be positive"),
    ("export: {calibration: {data: missing-dir}, ", "export.calibration.data: not found"),
    ("export: {calibration: {agreement: 1.5}, ", "export.calibration.agreement: must be in (0, 1], got 1.5"),
    ("export: {calibration: {tasks: [demo]}, ", "export.calibration.tasks: only a task bank has tasks"),
    ("export: {calibration: {fallback: maybe}, ", "export.calibration.fallback: must be true or false"),
])
def test_calibration_settings_are_validated_with_the_recipe(tmp_path, capsys, change, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(INT8.replace("export: {", change))
    assert main(["export", str(path), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_too_few_or_undecodable_calibration_images_are_refused_in_one_line(demo_export, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(10):
        Image.new("RGB", (48, 48), (10 * i, 0, 0)).save(few / f"{i}.png")
    path, out = copy_of(demo_export, tmp_path, INT8.replace("export: {", f"export: {{calibration: {{data: {few}}}, "))
    assert main(["--quiet", "export", str(path), "--out", str(out)]) == 2
    assert "has 10 usable images, fewer than the minimum 32" in capsys.readouterr().err
    for i in range(10, 40):
        Image.new("RGB", (48, 48), (0, 5 * i, 0)).save(few / f"{i}.png")
    (few / "20.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--quiet", "export", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "20.png" in err[-1] and not (out / "onnx" / "model_int8.onnx").exists()


def test_a_qdq_graph_with_a_zero_scale_is_refused_at_load_naming_the_node(int8_export, tmp_path):
    out, _ = int8_export
    graph = onnx.load(out / "onnx" / "model_int8.onnx")
    node = next(n for n in graph.graph.node if n.op_type == "DequantizeLinear"
                and any(t.name == n.input[1] for t in graph.graph.initializer))
    scale = next(t for t in graph.graph.initializer if t.name == node.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), scale.name))
    broken = tmp_path / "model_int8.onnx"
    onnx.save(graph, broken)
    users = {n.name for n in graph.graph.node if len(n.input) > 1 and n.input[1] == scale.name}  # Q and DQ share it
    # the shared check of every graph runtime (runtimes/onnx_files.checked_graph), not one runner's
    graph_runtimes = [entry for entry in registry.RUNTIMES.values() if entry.loads == "onnx" and not entry.unavailable()]
    assert "onnxruntime-cpu" in [entry.name for entry in graph_runtimes]
    for entry in graph_runtimes:
        with pytest.raises(IntegrityError, match="has a zero or non-finite scale") as refused:
            entry.create(broken).activate()
        assert str(refused.value).count("\n") == 0 and any(f"node '{name}'" in str(refused.value) for name in users)
    assert main(["build-engine", str(broken), "--out", str(tmp_path / "e.engine")]) == 2


BLOCK_MODELOPT = """
import sys
class NoModelOpt:
    def find_spec(self, name, path=None, target=None):
        if name == "modelopt" or name.startswith("modelopt."):
            raise ModuleNotFoundError("No module named 'modelopt'")
sys.meta_path.insert(0, NoModelOpt())
import importlib.util
importlib.util.find_spec = (lambda real: lambda name, *a: None if name.split(".")[0] == "modelopt" else real(name, *a))(importlib.util.find_spec)
from transmiter_deploy.cli import main
from transmiter_deploy.deploy.parity import run_graph
sys.exit(main(["--quiet", "export", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_int8_without_modelopt_exits_3_naming_the_extra(demo_export, tmp_path):
    path, out = copy_of(demo_export, tmp_path)
    result = subprocess.run([sys.executable, "-c", BLOCK_MODELOPT, str(path), str(out)], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "asks for int8" in last and "pip install 'transmiter-deploy[int8]'" in last


def test_export_onnx_adds_int8_from_calibration_data_and_needs_it(int8_export, tmp_path, capsys):
    from transmiter_deploy.demo.weights import shipped_weights_dir

    out, _ = int8_export
    common = ["export-onnx", "--model", "TM-Demo-Target", "--checkpoint",
              str(shipped_weights_dir() / "TM-Demo-Target.safetensors"), "--adapter", str(out / "adapters" / "plus"),
              "--head", str(out / "heads" / "target"), "--images", str(out / "data" / "test"), "--no-fp16",
              "--precision", "int8"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    assert "--precision int8 needs --calibration-data" in capsys.readouterr().err
    assert main([*common, "--calibration-data", str(out / "data" / "train"), "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "head.onnx", "head.safetensors", "model_int8.onnx"}
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["gates"]["int8"]["passed"]


def test_without_test_images_the_gate_uses_held_out_training_images_and_says_so(demo_export, tmp_path):
    recipe, outcome = demo_export
    names = json.loads((outcome.export_dir / "manifest.json").read_text())["class_names"]
    text = f"""\
name: no-test-split
source: {{name: TM-Demo-Source, demo_weights: TM-Demo-Source}}
finetuned: {{name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}}
target: {{name: TM-Demo-Target, demo_weights: TM-Demo-Target}}
data: {{train: {outcome.out_dir / "data" / "train"}, classes: {json.dumps(names)}}}
head: {{logit_width: 64}}
extraction: {{epochs: 2}}
plus: {{enabled: false}}
export: {{precisions: [fp32, int8], batch: {{min: 1, opt: 4, max: 8}}}}
runtimes: [onnxruntime]
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = run_export(load_recipe(path), tmp_path / "out", progress=False, log=lambda _: None)
    (gate,) = result.gates
    assert not gate["labelled"] and gate["accuracy"] == {} and len(gate["criteria"]) == 1
    assert gate["images"].startswith("80 held-out training images (agreement only")
    manifest = json.loads((result.export_dir / "manifest.json").read_text())
    assert manifest["calibration"]["int8"]["images"] == 128  # drawn from the 240 images not held out
    assert "held-out training images (agreement only" in (tmp_path / "out" / "report.md").read_text()


def test_a_recipe_that_drops_int8_takes_its_graphs_out_of_the_export(int8_export, tmp_path):
    out, _ = int8_export
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = json.loads((copy / "onnx" / "manifest.json").read_text())["files"]
    path = tmp_path / "recipe.yaml"
    path.write_text(SMALL_DEMO_INT8.replace("precisions: [fp32, fp16, int8]", "precisions: [fp32, fp16]"))
    outcome = run_export(load_recipe(path), copy, progress=False, log=lambda _: None)
    manifest = json.loads((copy / "onnx" / "manifest.json").read_text())
    assert set(before) - set(manifest["files"]) == {"model_int8.onnx"}
    assert {name: manifest["files"][name]["sha256"] for name in manifest["files"]} == \
        {name: before[name]["sha256"] for name in manifest["files"]}  # the rest untouched
    assert not (copy / "onnx" / "model_int8.onnx").exists() and "int8" not in manifest.get("calibration", {})
    assert outcome.gates == [] and all(row["graph"] != "model_int8.onnx" for row in outcome.validation)
    parity = json.loads((copy / "onnx" / "parity.json").read_text())
    assert not [name for name in parity["checks"] if "int8" in name] and "int8" not in parity.get("gates", {})


def test_biases_computed_in_the_graph_are_said_in_one_line_not_one_warning_each(tmp_path, caplog, capfd):
    """A graph onnxslim could not simplify keeps Conv biases computed by nodes; ONNX Runtime's
    quantizer warns once per such bias on the root logger (157 lines on MobileCLIP-S1): one line."""
    from onnx import TensorProto, helper

    from transmiter_deploy.deploy.precisions.int8 import convert

    rng = np.random.default_rng(0)
    # 32 channels: ModelOpt leaves convolutions of few channels unquantised
    weights = [numpy_helper.from_array(rng.standard_normal((32, 3 if i == 0 else 32, 3, 3)).astype(np.float32), f"w{i}")
               for i in range(3)]
    biases = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), f"b{i}") for i in range(3)]
    nodes, previous = [], "pixel_values"
    for i in range(3):  # each bias passed through an Identity: computed, not an initialiser
        nodes += [helper.make_node("Identity", [f"b{i}"], [f"computed_b{i}"], name=f"bias{i}"),
                  helper.make_node("Conv", [previous, f"w{i}", f"computed_b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "computed-biases",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", 32, 16, 16])],
                              weights + biases)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    calibration = {"pixel_values": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    with caplog.at_level("WARNING"):
        quantised = convert(tmp_path / "model.onnx", calibration, ())
    assert sum(node.op_type == "QuantizeLinear" for node in quantised.graph.node) > 0
    said = [record.getMessage() for record in caplog.records]
    assert not any(message.startswith("Expected bias") for message in said), said
    assert sum("biases of model.onnx are computed in the graph" in message for message in said) == 1, said
    assert "Expected bias" not in capfd.readouterr().err
