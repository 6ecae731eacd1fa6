"""Runners and the comparator on real runtimes (PyTorch, ONNX Runtime CPU), the engine manifest
check with hand-written manifests, and `build-engine` where TensorRT is missing. TensorRT's own
tests run only where TensorRT and a GPU exist."""

import json

import numpy as np
import pytest
import torch
from conftest import make_head_and_adapter

from transmiter_deploy.cli import main
from transmiter_deploy.errors import DependencyError, InputError, IntegrityError
from transmiter_deploy.deploy.fusion import DeployedClassifier, FoldedHead
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.deploy.onnx_export import export_deployment, parity_pixels
from transmiter_deploy.runtimes import registry
from transmiter_deploy.runtimes.base import InputSpec, RunSettings
from transmiter_deploy.runtimes.onnx_files import graph_precision
from transmiter_deploy.runtimes.compare import judge
from transmiter_deploy.runtimes.compare import compare
from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner
from transmiter_deploy.runtimes.pytorch import TorchRunner
from transmiter_deploy.runtimes.tensorrt import (
    ENGINE_FORMAT,
    tensorrt_available,
    BatchProfile,
    build_engine,
    check_engine_manifest,
    manifest_path,
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, 6, model=model)
    out = tmp_path_factory.mktemp("runners") / "export"
    pixels = parity_pixels(model, None, count=6)
    export_deployment(model, head, artifact, out, pixels, log=lambda _: None)
    size = model.preprocess_config["image_size"][0]
    torch_runner = TorchRunner(DeployedClassifier(model.model.visual, FoldedHead(head, artifact)),
                               input_spec=InputSpec("pixel_values", (None, 3, size, size)))
    with torch_runner:
        yield out, torch_runner, pixels.numpy()


@pytest.mark.runtime("pytorch-cpu")
@pytest.mark.runtime("onnxruntime-cpu")
@pytest.mark.precision("fp32")
@pytest.mark.precision("fp16")
def test_onnx_runtime_matches_pytorch_within_each_precision(export):
    out, torch_runner, pixels = export
    with OnnxRuntimeRunner(out / "model.onnx") as runner:
        fp32 = compare(torch_runner, runner, pixels)
    assert fp32["passed"] and fp32["precision"] == "fp32" and fp32["max_abs"] <= 1e-4
    with OnnxRuntimeRunner(out / "model_fp16.onnx") as runner:
        fp16 = compare(torch_runner, runner, pixels)
    assert fp16["passed"] and fp16["precision"] == "fp16" and fp16["top1_agreement"] >= 0.995
    assert fp16["max_abs"] > fp32["max_abs"]  # the fp16 graph really computes in reduced precision


def test_comparator_fails_a_candidate_that_computes_something_else(export):
    out, torch_runner, pixels = export

    class Negated:  # same shapes, different numbers
        name, graph, precision, input_spec = "negated", "-", "fp32", torch_runner.input_spec

        def infer(self, batch):
            return -torch_runner.infer(batch)

    assert not compare(torch_runner, Negated(), pixels)["passed"]


@pytest.mark.parametrize("make_input, message", [
    (lambda p: p.astype(np.float64), "must be float32, got float64"),
    (lambda p: p[0], "must have rank 4"),
    (lambda p: p[:, :, :-1], r"must be \(N, 3, \d+, \d+\), got .* \(axis 2\)"),
    (lambda p: p[:0], "batch 0 is outside 1..8"),
    (lambda p: np.concatenate([p, p]), "batch 12 is outside 1..8"),
    (lambda p: p.tolist(), "must be a numpy array"),
])
@pytest.mark.runtime("pytorch-cpu")
@pytest.mark.runtime("onnxruntime-cpu")
def test_every_runner_refuses_malformed_input_in_one_line(export, make_input, message):
    out, torch_runner, pixels = export
    for runner in (OnnxRuntimeRunner(out / "model.onnx", RunSettings(max_batch=8)),
                   TorchRunner(torch_runner.module, input_spec=InputSpec("pixel_values", torch_runner.input_spec.shape,
                                                                         max_batch=8))):
        with runner, pytest.raises(InputError, match=message):
            runner.infer(make_input(pixels))


@pytest.mark.runtime("openvino-cpu")
@pytest.mark.precision("fp32")
@pytest.mark.precision("fp16")
def test_openvino_matches_pytorch_within_each_precision(export):
    entry = registry.runtime("openvino-cpu")
    reason = entry.unavailable()
    if reason is not None:  # the dev extra installs it: CI runs this
        pytest.skip(reason)
    out, torch_runner, pixels = export
    with entry.create(out / "model.onnx", RunSettings(threads=2)) as runner:
        fp32 = compare(torch_runner, runner, pixels)
        assert runner.name == "openvino-cpu" and runner.input_spec.shape[1:] == torch_runner.input_spec.shape[1:]
    assert fp32["passed"] and fp32["precision"] == "fp32" and fp32["max_abs"] <= 1e-4
    with entry.create(out / "model_fp16.onnx") as runner:
        fp16 = compare(torch_runner, runner, pixels)
    assert fp16["passed"] and fp16["precision"] == "fp16" and fp16["top1_agreement"] >= 0.995
    assert fp16["max_abs"] > fp32["max_abs"]


@pytest.mark.runtime("openvino-cpu-bf16")
def test_openvino_bf16_is_judged_by_top1_alone_and_only_where_the_cpu_has_bf16(export):
    entry = registry.runtime("openvino-cpu-bf16")
    reason = entry.unavailable()
    if reason is not None:  # an AVX2-only CPU: the refusal is tested below
        pytest.skip(reason)
    out, torch_runner, pixels = export
    with registry.runtime("openvino-cpu").create(out / "model.onnx", RunSettings(threads=2)) as runner:
        fp32 = compare(torch_runner, runner, pixels)
    with entry.create(out / "model.onnx", RunSettings(threads=2)) as runner:
        bf16 = compare(torch_runner, runner, pixels)
    assert runner.name == "openvino-cpu-bf16" and bf16["precision"] == "fp32"
    assert bf16["tolerance"] == {"max_abs": None, "top1": 0.99} and fp32["tolerance"]["max_abs"] == 1e-4
    # it computes in bf16 indeed (errors far above fp32's), and agrees on top-1
    assert bf16["max_abs"] > 100 * fp32["max_abs"] and bf16["passed"] and bf16["top1_agreement"] >= 0.99


def test_openvino_refuses_what_it_cannot_do_in_one_line(export, tmp_path):
    from transmiter_deploy.runtimes.openvino import OpenVinoRunner

    reason = registry.runtime("openvino-cpu").unavailable()
    if reason is not None:
        pytest.skip(reason)
    out, torch_runner, pixels = export
    with pytest.raises(InputError, match="unknown OpenVINO inference precision 'f8'"):
        OpenVinoRunner(out / "model.onnx", inference_precision="f8")
    import openvino

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(DependencyError, match="this CPU has no bf16 arithmetic"):
            OpenVinoRunner(out / "model.onnx", inference_precision="bf16")
        assert "this CPU has no bf16 arithmetic" in registry.runtime("openvino-cpu-bf16").unavailable()
    broken = tmp_path / "model.onnx"
    broken.write_bytes((out / "model.onnx").read_bytes()[:1000])
    with pytest.raises(InputError, match="OpenVINO cannot load") as refused:
        OpenVinoRunner(broken).activate()
    assert str(refused.value).count("\n") == 0


def test_unknown_provider_and_corrupt_graph_are_refused(export, tmp_path):
    out, _, _ = export
    if not torch.cuda.is_available():  # onnxruntime-gpu lists CUDA here but would run on the CPU
        with pytest.raises(DependencyError, match="needs a CUDA GPU"):
            OnnxRuntimeRunner(out / "model.onnx", provider="cuda")
    with pytest.raises(InputError, match="unknown ONNX Runtime provider 'rocm'"):
        OnnxRuntimeRunner(out / "model.onnx", provider="rocm")
    broken = tmp_path / "model.onnx"
    broken.write_bytes((out / "model.onnx").read_bytes()[:1000])
    with pytest.raises(InputError, match="ONNX Runtime cannot load"):
        OnnxRuntimeRunner(broken).activate()


def hand_written_manifest(**changes):
    manifest = {"format": ENGINE_FORMAT, "format_version": 1, "built": True, "tensorrt_version": "10.13.0.35",
                "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                "input": {"name": "pixel_values", "shapes": {}}, "onnx_sha256": "0" * 64}
    manifest.update(changes)
    return manifest


def test_engine_manifest_must_match_the_running_tensorrt_and_gpu():
    here = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_engine_manifest(hand_written_manifest(), "10.13.0.35", here, "m.json")
    with pytest.raises(IntegrityError, match="built by TensorRT 10.13.0.35, this is TensorRT 11.0.0"):
        check_engine_manifest(hand_written_manifest(), "11.0.0", here, "m.json")
    with pytest.raises(IntegrityError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0\), this GPU is NVIDIA L4 \(sm 8.9\)"):
        check_engine_manifest(hand_written_manifest(), "10.13.0.35", {"name": "NVIDIA L4", "compute_capability": "8.9"},
                              "m.json")
    with pytest.raises(InputError, match="no engine was built here"):
        check_engine_manifest(hand_written_manifest(built=False, reason_not_built="no GPU"), "10.13.0.35", here, "m.json")
    with pytest.raises(IntegrityError, match="newer than this"):
        check_engine_manifest(hand_written_manifest(format_version=2), "10.13.0.35", here, "m.json")
    broken = hand_written_manifest()
    del broken["gpu"]
    with pytest.raises(IntegrityError, match="missing key 'gpu'"):
        check_engine_manifest(broken, "10.13.0.35", here, "m.json")


def test_batch_profile_is_validated():
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        BatchProfile(4, 2, 8)


@pytest.mark.skipif(tensorrt_available() is None, reason="TensorRT and a GPU are present")
def test_build_engine_without_tensorrt_exits_3_and_leaves_the_trtexec_command(export, tmp_path, capsys):
    out, _, _ = export
    engine = tmp_path / "engines" / "model.engine"
    status = main(["build-engine", str(out / "model.onnx"), "--out", str(engine), "--max-batch", "16"])
    err = capsys.readouterr().err.strip()
    assert status == 3 and err.count("\n") == 0 and "no engine built" in err
    assert not engine.exists()
    manifest = json.loads(manifest_path(engine).read_text())
    assert manifest["built"] is False and manifest["input"]["shapes"]["max"][0] == 16
    assert manifest["trtexec"].startswith(f"trtexec --onnx={out / 'model.onnx'} --saveEngine={engine} --stronglyTyped")
    assert main(["build-engine", str(tmp_path / "missing.onnx"), "--out", str(engine)]) == 2


@pytest.mark.runtime("tensorrt")
@pytest.mark.skipif(tensorrt_available() is not None, reason=f"needs TensorRT and a GPU ({tensorrt_available()})")
def test_tensorrt_engine_matches_onnx_runtime(export, tmp_path):  # pragma: no cover - GPU hosts only
    from transmiter_deploy.runtimes.tensorrt import TensorRTRunner

    out, torch_runner, pixels = export
    for graph in ("model.onnx", "model_fp16.onnx"):
        engine = tmp_path / graph.replace(".onnx", ".engine")
        build_engine(out / graph, engine, BatchProfile(1, 4, 8))
        with TensorRTRunner(engine) as runner:
            assert compare(torch_runner, runner, pixels)["passed"]
            with pytest.raises(InputError, match="batch 12 is outside 1..8"):
                runner.infer(np.concatenate([pixels, pixels]))


@pytest.mark.runtime("pytorch-cuda")
@pytest.mark.runtime("pytorch-cuda-graphs")
@pytest.mark.runtime("onnxruntime-cuda")
@pytest.mark.parametrize("name", [n for n in registry.runtime_names("cuda") if registry.runtime(n).loads != "engine"])
def test_gpu_runtimes_match_pytorch_cpu(export, name):  # pragma: no cover - GPU hosts only
    entry = registry.runtime(name)
    reason = entry.unavailable()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    out, torch_runner, pixels = export
    expected = torch_runner.infer(pixels)  # before the GPU runner moves the shared module
    source = torch_runner.source if entry.loads == "module" else out / "model.onnx"
    options = {"input_spec": torch_runner.input_spec} if entry.loads == "module" else {}
    with entry.create(source, **options) as runner:
        row = judge("pytorch-cpu", expected, runner, runner.infer(pixels), len(pixels))
    assert row["passed"] and row["candidate"] == name


def test_a_runner_loads_nothing_until_activated_and_frees_on_deactivation(export):
    out, torch_runner, pixels = export
    runner = OnnxRuntimeRunner(out / "model.onnx")
    assert runner.session is None and not runner.active
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(pixels)
    with runner:
        assert runner.session is not None and runner.infer(pixels).shape == (len(pixels), 6)
    assert runner.session is None and not runner.active
    built = []

    def loader():
        built.append(1)
        return torch_runner.source

    lazy = TorchRunner(loader, input_spec=torch_runner.input_spec)
    assert built == []
    with lazy:
        np.testing.assert_allclose(lazy.infer(pixels), torch_runner.infer(pixels), rtol=0, atol=0)
    assert built == [1] and lazy.module is None


def test_a_graph_precision_comes_from_its_manifest_or_its_tensors_never_its_name(export, tmp_path):
    out, _, pixels = export
    assert graph_precision(out / "model_fp16.onnx") == "fp16" and graph_precision(out / "model.onnx") == "fp32"
    (tmp_path / "model_fp16.onnx").write_bytes((out / "model.onnx").read_bytes())  # fp32 under an fp16 name
    (tmp_path / "plain.onnx").write_bytes((out / "model_fp16.onnx").read_bytes())  # fp16 under a plain name
    assert graph_precision(tmp_path / "model_fp16.onnx") == "fp32" and graph_precision(tmp_path / "plain.onnx") == "fp16"
    with OnnxRuntimeRunner(tmp_path / "model_fp16.onnx") as runner:
        assert runner.precision == "fp32"
