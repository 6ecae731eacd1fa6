"""ONNX export on tiny real open_clip towers (random weights): structure, parity, precision, cost."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.deploy.fusion import FoldedHead, UnfoldedHead
from transmiter_deploy.deploy.graph_cost import count_macs
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.deploy.fusion import FP32_NODES
from transmiter_deploy.deploy.onnx_export import ExportSettings, export_deployment, parity_pixels
from transmiter_deploy.deploy.trace import to_onnx
from transmiter_deploy.deploy.precisions.fp16 import convert as to_mixed_fp16
from transmiter_deploy.runtimes.onnxruntime import ort_session

from conftest import make_head_and_adapter

K = 6


@pytest.fixture(scope="module", params=["TM-Tiny-ViT", "TM-Tiny-RN"])
def exported(request, tmp_path_factory):
    model = load_model(ModelSpec(request.param, init_seed=0))
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, K, model=model)
    out = tmp_path_factory.mktemp("export") / request.param
    report = export_deployment(model, head, artifact, out, parity_pixels(model, None, count=8), log=lambda _: None)
    return model, out, report


def test_files_manifest_and_io_contract(exported):
    model, out, report = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "head.onnx", "model_fp16.onnx", "head_fp16.onnx", "head.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name) and entry["bytes"] == (out / name).stat().st_size
        if name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(out / name), full_check=True)
    main = manifest["files"]["model.onnx"]
    assert main["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert main["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", K]}]
    assert manifest["files"]["model_fp16.onnx"]["inputs"][0]["dtype"] == "float32"  # fp32 I/O kept
    assert manifest["files"]["head.onnx"]["inputs"][0]["shape"] == ["batch", model.model.visual.output_dim]
    assert manifest["class_names"] == [f"class {i}" for i in range(K)]
    assert manifest["preprocess"]["image_size"] == [32, 32] and manifest["preprocess"]["color_order"] == "RGB"
    assert manifest["preprocess"]["resize_mode"] == "shortest" and manifest["preprocess"]["crop"] == "center"
    assert len(manifest["preprocess"]["mean"]) == 3 and manifest["preprocess"]["interpolation"] == "bicubic"
    assert manifest["target_model"]["name"] == model.identity.name
    assert manifest["opset"] >= 17 and manifest["versions"]["onnx"]
    assert onnx.load(out / "model.onnx").opset_import[0].version >= 17
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staging leftovers


def test_parity_checks_pass_with_stated_tolerances(exported):
    _, out, report = exported
    checks = json.loads((out / "parity.json").read_text())["checks"]
    assert report.passed
    assert checks["onnx_fp32_vs_torch"]["max_abs"] <= 1e-4
    assert checks["onnx_fp32_vs_torch"]["top1_agreement"] == 1.0
    assert checks["torch_folded_vs_unfolded"]["max_abs"] <= 1e-4
    assert checks["onnx_fp32_dynamic_batch"]["passed"]
    assert checks["onnx_fp16_vs_torch_fp32"]["finite"]
    assert checks["onnx_fp16_vs_torch_fp32"]["max_abs_over_sample_std"] < 0.05


def _fp32_patterns_match(name: str) -> bool:
    import re

    return any(re.match(pattern, name) for pattern in FP32_NODES)


def test_fp16_graph_keeps_statistics_fp32_and_weights_fp16(exported):
    _, out, _ = exported
    graph = onnx.shape_inference.infer_shapes(onnx.load(out / "model_fp16.onnx")).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]}
    stats = [n for n in graph.node if _fp32_patterns_match(n.name) and n.op_type != "Cast"]
    assert {n.name.split("/")[-2] for n in stats} >= {"normalise", "stats", "destandardise"}
    float_outputs = 0
    for node in stats:
        for output in node.output:
            assert dtypes.get(output) != onnx.TensorProto.FLOAT16, node.name  # never computed in fp16
            float_outputs += dtypes.get(output) == onnx.TensorProto.FLOAT
    assert float_outputs >= 8
    weights = {i.name: i.data_type for i in graph.initializer}
    gemm_weights = [n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in weights
                    and not _fp32_patterns_match(n.name)]
    assert gemm_weights and all(weights[w] == onnx.TensorProto.FLOAT16 for w in gemm_weights)


def test_reference_size_head_cost_and_folding_saves_macs():
    # d = 768, D = C = 1024, K = 100, MLP ratio 4: the paper's "~0.01 GFLOPs" adapter.
    head, artifact = make_head_and_adapter(768, 1024, 100, mlp_scale=0.0)
    features = torch.nn.functional.normalize(torch.randn(2, 768), dim=1)
    folded = count_macs(to_onnx(FoldedHead(head, artifact), features, "image_features", "logits", 17, "head"))
    unfolded = count_macs(to_onnx(UnfoldedHead(head, artifact), features, "image_features", "logits", 17, "head"))
    assert folded["total"] <= 10_500_000
    assert folded["total"] < unfolded["total"]
    expected = 768 * 1024 + 768 + 2 * 4 * 1024 * 1024 + 1024 * 100  # push, mean, MLP, pull
    assert folded["total"] == expected


def test_fp16_head_stays_finite_at_large_sigma_in_true_fp16(tmp_path):
    # ONNX Runtime's CPU kernels upcast fp16 internally, so the precision plan is
    # checked with the ONNX reference evaluator, which computes in real fp16.
    head, artifact = make_head_and_adapter(64, 256, 10, scale=500.0)
    features = torch.nn.functional.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(3)), dim=1)
    logits = features @ head.weight.T
    assert float(logits.std(dim=1).min()) >= 50.0  # the inputs this check is about
    folded = FoldedHead(head, artifact)
    onnx.save(to_onnx(folded, features[:2], "image_features", "logits", 17, "head"), tmp_path / "head.onnx")
    # Calibrated on mild inputs (sigma ~0.5), deployed on sigma >= 50: magnitude
    # rules alone would put the statistics in fp16; naming them keeps them fp32.
    calibration = {"image_features": 0.01 * features.numpy()}
    mixed = to_mixed_fp16(tmp_path / "head.onnx", calibration)
    result = ReferenceEvaluator(mixed).run(None, {"image_features": features.numpy()})[0]
    with torch.no_grad():
        expected = folded(features).numpy()
    assert np.isfinite(result).all()
    spread = expected.std(axis=1, keepdims=True)
    assert float((np.abs(result - expected) / spread).max()) < 0.05
    # negative control: the same conversion without the named fp32 nodes overflows
    unprotected = to_mixed_fp16(tmp_path / "head.onnx", calibration, fp32_nodes=())
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ReferenceEvaluator(unprotected).run(None, {"image_features": features.numpy()})[0]
    assert not np.isfinite(bad).all()


def test_untraceable_tower_is_an_input_error():
    from transmiter_deploy.errors import InputError

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x @ x.mT)[0]  # no ONNX symbolic for eigh

    with pytest.raises(InputError, match="cannot export tower X to ONNX"):
        to_onnx(Untraceable(), torch.randn(2, 4, 4), "x", "y", 17, "tower X")


def test_softmax_export_outputs_probabilities(tmp_path):
    model = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, K, model=model)
    pixels = parity_pixels(model, None, count=4)
    report = export_deployment(model, head, artifact, tmp_path / "out", pixels,
                               ExportSettings(softmax=True, precisions=("fp32",)), log=lambda _: None)
    assert report.passed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["output"] == "probabilities" and set(manifest["files"]) == {"model.onnx", "head.onnx", "head.safetensors"}
    assert manifest["files"]["model.onnx"]["outputs"][0]["name"] == "probabilities"
    session = ort_session(tmp_path / "out" / "model.onnx")
    probabilities = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_head_safetensors_alone_reproduces_the_folded_head(exported):
    from transmiter_deploy.errors import IntegrityError
    from transmiter_deploy.deploy.head_weights import head_logits_numpy, read_head_metadata

    model, out, report = exported
    manifest = json.loads((out / "manifest.json").read_text())
    meta = read_head_metadata(out / "head.safetensors")
    assert meta["format"] == "transmiter-deploy/folded-head" and int(meta["num_task_classes"]) == K
    assert int(meta["feature_dim"]) == manifest["feature_dim"] and meta["sigma_mode"] == manifest["adapter"]["sigma_mode"]
    assert report.parity["checks"]["head_safetensors_vs_torch"]["passed"]
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, K, model=model)
    features = torch.randn(5, manifest["feature_dim"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = FoldedHead(head, artifact)(torch.nn.functional.normalize(features, dim=-1)).numpy()
    # raw (unnormalised) features: the file's consumer normalises them first
    got = head_logits_numpy(out / "head.safetensors", 7.5 * features.numpy(), manifest["files"]["head.safetensors"]["sha256"])
    assert np.abs(got - expected).max() <= 1e-4
    with pytest.raises(IntegrityError, match="sha256"):
        head_logits_numpy(out / "head.safetensors", features.numpy(), "0" * 64)


def test_an_optimisation_pass_that_fails_is_skipped_with_one_warning(tmp_path, caplog):
    """A library pass that raises (onnxslim's ConvMul fusion did, on MobileCLIP's towers) leaves the
    graph as traced, named in one warning line; the graph still computes what the module does."""
    import onnxslim

    from transmiter_deploy.deploy.trace import slimmed_or_as_traced
    from transmiter_deploy.runtimes.onnx_files import graph_structure, weights_apart

    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    example = torch.randn(3, 8)
    torch.onnx.export(module, (example,), str(tmp_path / "traced.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    structure, _ = weights_apart(tmp_path / "traced.onnx", tmp_path)
    before = structure.SerializeToString()

    def failing(model):
        del model.graph.node[0]  # a pass that changes its input, then fails
        raise AttributeError("'Variable' object has no attribute 'values'")

    with caplog.at_level("WARNING"):
        kept = slimmed_or_as_traced(structure, failing, "onnxslim 0.0-test", "the test graph")
    assert kept.SerializeToString() == before  # as traced, untouched by the failed attempt
    (record,) = caplog.records
    assert record.getMessage() == ("warning: onnxslim 0.0-test failed on the test graph (AttributeError: 'Variable' "
                                   "object has no attribute 'values'); exported without it")
    slimmed = slimmed_or_as_traced(graph_structure(tmp_path / "traced.onnx"), onnxslim.slim, "onnxslim", "the test graph")
    assert len(slimmed.graph.node) <= len(kept.graph.node)
