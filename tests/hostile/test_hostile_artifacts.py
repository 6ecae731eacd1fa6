"""Hostile artifacts and values: tampered manifests, wrong types, CSVs that point elsewhere,
awkward class names, extreme logits, broken graphs handed to the engine builder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.features.adapter_artifact import AdapterArtifact, load_adapter, save_adapter
from transmiter_deploy.cli import main
from transmiter_deploy.features.datasets import open_dataset
from transmiter_deploy.errors import InputError
from transmiter_deploy.features.models import ModelIdentity


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    config = AdapterConfig(num_task_classes=3, logit_width=8, latent_dim=8)
    names = [f"c{i}" for i in range(8)]
    artifact = AdapterArtifact(TransMiterAdapter(config), names[:3], names[3:], "extracted",
                               ModelIdentity("TM-Tiny-ViT", init_seed=0))
    return save_adapter(artifact, tmp_path / "adapter")


def edit_manifest(directory: Path, change) -> None:
    path = directory / "adapter.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=99), "format version 99 is newer than this"),
    (lambda m: m.pop("class_names"), "missing key 'class_names'"),
    (lambda m: m.update(stage=3), "key 'stage' must be str, got int"),
    (lambda m: m.update(class_names=["c0", 1, "c2"]), "'class_names' must be a list of strings"),
    (lambda m: m.update(stage="finished"), "unknown stage 'finished'"),
    (lambda m: m["config"].update(latent_dim="wide"), "latent_dim must be a positive integer"),
    (lambda m: m["files"]["adapter.safetensors"].update(sha256="0" * 64), "does not match the sha256"),
])
def test_tampered_adapter_manifests_are_refused_by_key(adapter_dir, change, message):
    edit_manifest(adapter_dir, change)
    with pytest.raises(InputError, match=message):
        load_adapter(adapter_dir)


def test_cli_reports_a_tampered_adapter_in_one_line(adapter_dir, tmp_path, capsys):
    edit_manifest(adapter_dir, lambda m: m.update(format_version=99))
    status = main(["transfer", "--adapter", str(adapter_dir), "--source-cache", "x", "--source-head", "x",
                   "--target-cache", "x", "--target-head", "x", "--out", str(tmp_path / "moved")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "newer than this" in err
    assert not (tmp_path / "moved").exists()


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for name in ("one.png", "two.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(root / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return root


@pytest.mark.parametrize("rows, message", [
    ("file,label\none.png,a\n", "needs a 'path' column"),
    ("path,label\none.png,zebra\n", "line 2: unknown label 'zebra'"),
    ("path,label\n../outside.png,a\n", "line 2: path '../outside.png' is outside the dataset root"),
    ("path,label\nmissing.png,a\n", "line 2: file not found: missing.png"),
    ("path,label\n", "has no rows"),
])
def test_bad_csv_datasets_name_the_line(image_root, rows, message):
    (image_root / "data.csv").write_text(rows)
    with pytest.raises(InputError, match=message):
        open_dataset(image_root / "data.csv", ["a", "b"])


def test_symlink_out_of_the_dataset_root_is_refused(image_root):
    (image_root / "link.png").symlink_to(image_root.parent / "outside.png")
    (image_root / "data.csv").write_text("path,label\nlink.png,a\n")
    with pytest.raises(InputError, match="outside the dataset root"):
        open_dataset(image_root / "data.csv", ["a", "b"])


def test_unicode_and_comma_class_names_survive_csv_and_heads(image_root, tmp_path, capsys):
    classes = ["crème brûlée", "sushi, nigiri", "北京烤鸭"]
    (image_root / "data.csv").write_text('path,label\none.png,crème brûlée\ntwo.png,"sushi, nigiri"\n',
                                         encoding="utf-8")
    dataset = open_dataset(image_root / "data.csv", classes)
    assert [record.label for record in dataset.records] == [0, 1]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    status = main(["--quiet", "head", "--model", "TM-Tiny-ViT", "--init-seed", "0", "--classes",
                   str(tmp_path / "classes.txt"), "--width", "16", "--out", str(tmp_path / "head")])
    assert status == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "head" / "head.json").read_text(encoding="utf-8"))
    assert manifest["class_names"] == classes


def test_duplicate_class_names_are_refused(tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("cat\ndog\ncat\n")
    status = main(["--quiet", "head", "--model", "TM-Tiny-ViT", "--init-seed", "0", "--classes",
                   str(tmp_path / "classes.txt"), "--width", "16", "--out", str(tmp_path / "head")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "duplicate" in err and not (tmp_path / "head").exists()


def test_logits_with_sigma_1e4_stay_finite_and_scale_back(adapter_dir):
    adapter = load_adapter(adapter_dir).adapter
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, generator=generator) * 1e4 + 3e4
    with torch.no_grad():
        out = adapter(logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1.0)  # a fresh adapter is the identity at any scale


@pytest.mark.parametrize("content", [b"", b"\x08\x01garbage", None])
def test_engine_builder_refuses_broken_graphs_before_looking_for_tensorrt(tmp_path, capsys, content):
    graph = tmp_path / "model.onnx"
    if content is not None:
        graph.write_bytes(content)
    status = main(["build-engine", str(graph), "--out", str(tmp_path / "model.engine")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0
    assert ("not found" in err) if content is None else ("not a readable ONNX model" in err or "graph input" in err)
    assert not (tmp_path / "model.engine").exists() and not (tmp_path / "model.engine.json").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_logits_are_refused_naming_the_row(adapter_dir, bad):
    from transmiter_deploy.method.adapter import check_logits

    logits = torch.randn(3, 8)
    logits[1, 2] = bad
    with pytest.raises(InputError, match=r"test logits: 1 samples have NaN/inf logits \(first: row 1\)"):
        check_logits(logits, 8, "test logits")


def test_constant_logits_sigma_zero_are_refused(adapter_dir):
    from transmiter_deploy.method.adapter import check_logits

    logits = torch.randn(4, 8)
    logits[2] = 7.0  # every class equal: the standardisation would divide by zero
    with pytest.raises(InputError, match="constant"):
        check_logits(logits, 8, "test logits")


def test_fp16_graph_stays_finite_on_extreme_pixels_where_fp32_does(tmp_path):
    from transmiter_deploy.features.models import ModelSpec, load_model
    from transmiter_deploy.deploy.onnx_export import export_deployment, parity_pixels
    from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    from conftest import make_head_and_adapter

    model = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, 6, model=model)
    export_deployment(model, head, artifact, tmp_path / "export", parity_pixels(model, None, count=4), log=lambda _: None)
    extreme = (np.random.default_rng(0).standard_normal((4, 3, 32, 32)) * 50).astype(np.float32)
    extreme[0] = 0.0  # a black frame (after normalisation): all features tiny
    with OnnxRuntimeRunner(tmp_path / "export" / "model.onnx") as runner:
        fp32 = runner.infer(extreme)
    with OnnxRuntimeRunner(tmp_path / "export" / "model_fp16.onnx") as runner:
        fp16 = runner.infer(extreme)
    assert np.isfinite(fp32).all() and np.isfinite(fp16).all()


@pytest.mark.parametrize("row, message", [(np.zeros(8), "row 1 has zero norm"), (np.full(8, np.nan), "row 1 holds NaN")])
def test_features_that_cannot_be_normalised_are_refused_by_the_python_head(tmp_path, row, message):
    from conftest import make_head_and_adapter
    from transmiter_deploy.deploy.fusion import FoldedHead
    from transmiter_deploy.deploy.head_weights import head_logits_numpy, write_head_safetensors

    head, artifact = make_head_and_adapter(feature_dim=8, width=12, num_classes=3)
    write_head_safetensors(FoldedHead(head, artifact), tmp_path / "head.safetensors")
    features = np.ones((3, 8))
    assert np.isfinite(head_logits_numpy(tmp_path / "head.safetensors", features)).all()
    features[1] = row
    with pytest.raises(InputError, match=message):
        head_logits_numpy(tmp_path / "head.safetensors", features)
