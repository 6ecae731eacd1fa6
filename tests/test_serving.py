"""The serving API (transmiter_deploy/serving/deployment.py) and `transmiter predict` on the
session's demo exports: the preprocessing is the models' own, the graph comes from the manifest,
results equal the graph run directly, banks answer per task, tampering and bad images refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from transmiter_deploy.cli import main
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.datasets import decode_image
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.features.preprocess import record_transform
from transmiter_deploy.runtimes import registry
from transmiter_deploy.serving.deployment import SINGLE_TASK, Deployment, read_export, top_k
from transmiter_deploy.serving.predict import image_paths


def odd_images(tmp_path):
    """Images of other sizes, aspect ratios and modes than the models were trained on."""
    rng = np.random.default_rng(3)
    shapes = {"wide.png": ((37, 91, 3), "RGB"), "tall.jpg": ((120, 50, 3), "RGB"), "grey.png": ((64, 64), "L"),
              "alpha.png": ((40, 40, 4), "RGBA"), "tiny.png": ((5, 7, 3), "RGB")}
    paths = []
    for name, (shape, mode) in shapes.items():
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def test_images(demo_export):
    _, outcome = demo_export
    return sorted((outcome.out_dir / "data" / "test").rglob("*.png"))[:12]


@pytest.mark.parametrize("model", ["TM-Demo-Target", "ViT-B-16", "RN50"])
def test_the_manifest_preprocessing_is_the_models_own_bit_for_bit(tmp_path, model):
    from transmiter_deploy import demo  # noqa: F401  (registers the demo architectures)

    loaded = load_model(ModelSpec(model, init_seed=0))
    transform = record_transform(json.loads(json.dumps(loaded.preprocess_config)), model)  # as a manifest stores it
    for path in odd_images(tmp_path):
        image = decode_image(path)[0]
        assert torch.equal(transform(image), loaded.preprocess(image)), path.name


def test_a_single_task_export_classifies_as_its_graph_computes(demo_export, test_images):
    _, outcome = demo_export
    info = read_export(outcome.out_dir)  # the run's directory: its onnx/ is the export
    assert info.kind == "single" and info.directory == outcome.export_dir and [t.name for t in info.tasks] == [SINGLE_TASK]
    manifest = json.loads((outcome.export_dir / "manifest.json").read_text())
    assert info.tasks[0].class_names == manifest["class_names"]
    with Deployment.open(outcome.export_dir, precision="fp16") as deployment:
        assert deployment.runner.graph == info.graphs["fp16"] and deployment.runner.precision == "fp16"
        results = deployment.classify(test_images, topk=3)
        pixels = deployment.preprocess(test_images)
    with registry.verification_runtime().create(outcome.export_dir / info.graphs["fp16"]) as runner:
        direct = runner.infer(pixels)
    labels = [path.parent.name for path in test_images]
    for row, (result, label) in enumerate(zip(results, labels)):
        prediction = result[SINGLE_TASK]
        np.testing.assert_array_equal(prediction.scores, direct[row])
        assert [name for name, _ in prediction.top] == [info.tasks[0].class_names[i] for i in np.argsort(-direct[row])[:3]]
    assert np.mean([r[SINGLE_TASK].top[0][0] == label for r, label in zip(results, labels)]) >= 0.75


def test_images_as_paths_pil_images_and_arrays_give_the_same_pixels(demo_export, test_images):
    _, outcome = demo_export
    with Deployment.open(outcome.export_dir) as deployment:
        from_paths = deployment.preprocess(test_images[:3])
        pictures = [Image.open(path) for path in test_images[:3]]
        assert np.array_equal(deployment.preprocess(pictures), from_paths)
        assert np.array_equal(deployment.preprocess([np.asarray(p.convert("RGB")) for p in pictures]), from_paths)
        assert np.array_equal(deployment.decode(test_images[0].read_bytes()), from_paths[0])
        with pytest.raises(InputError, match="must be uint8"):
            deployment.preprocess([np.zeros((8, 8, 3), np.float32)])
        with pytest.raises(InputError, match="must be a path, a PIL image or a uint8 array"):
            deployment.preprocess([42])
        with pytest.raises(InputError, match="cannot decode image: not an image"):
            deployment.decode(b"not an image at all")


def test_a_bank_answers_every_task_from_one_run(demo_bank_export, test_images):
    info = read_export(demo_bank_export)
    assert info.kind == "bank" and len(info.tasks) == 2
    with Deployment.open(demo_bank_export) as deployment:
        both = deployment.classify(test_images[:4], topk=2)
        first = info.tasks[0].name
        only = deployment.classify(test_images[:4], topk=2, tasks=[first])
        with pytest.raises(InputError, match="has no task 'nope'"):
            deployment.classify(test_images[:1], tasks=["nope"])
    assert all(set(result) == {t.name for t in info.tasks} for result in both)
    assert [r[first].top for r in only] == [r[first].top for r in both]
    for task in info.tasks:
        assert all(name in task.class_names for r in both for name, _ in r[task.name].top)


def test_a_tampered_export_or_an_unknown_graph_is_refused_in_one_line(demo_export, tmp_path):
    _, outcome = demo_export
    copy = shutil.copytree(outcome.export_dir, tmp_path / "onnx")
    with pytest.raises(InputError, match="has no int4|unknown precision 'int4'"):
        read_export(copy).graph("int4")
    data = bytearray((copy / "head.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="head.safetensors") as refused:
        Deployment.open(copy)
    assert "\n" not in str(refused.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is not an export"):
        read_export(tmp_path / "empty")
    with pytest.raises(InputError, match="runs PyTorch modules"):
        Deployment.open(outcome.export_dir, "pytorch-cpu")


def test_top_k_is_highest_first_with_ties_in_class_order():
    scores = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    assert top_k(scores, ["a", "b", "c", "d"], 3) == [("b", 3.0), ("c", 3.0), ("a", 1.0)]
    assert top_k(scores, ["a", "b", "c", "d"], 10)[-1] == ("d", -2.0)
    with pytest.raises(InputError, match="k >= 1"):
        top_k(scores, ["a", "b", "c", "d"], 0)


def test_predict_prints_a_table_or_json_lines_and_names_unreadable_images(demo_export, test_images, tmp_path, capsys):
    _, outcome = demo_export
    folder = tmp_path / "images"
    folder.mkdir()
    for path in test_images[:5]:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    assert main(["--quiet", "predict", str(outcome.out_dir), str(folder), "--topk", "2"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 5 and all(line.split("\t")[1] == SINGLE_TASK for line in table)
    with Deployment.open(outcome.export_dir) as deployment:
        expected = deployment.classify(image_paths([folder]), topk=2)
    assert [line.split("\t")[2].split(" ")[0] for line in table] == [r[SINGLE_TASK].top[0][0] for r in expected]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "results.jsonl"
    assert main(["--quiet", "predict", str(outcome.out_dir), str(folder), "--json", str(out), "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("skipped" in line and "broken.png" in line for line in err)
    assert err[-1] == f"transmiter: error: 1 of 6 images could not be read (first: {folder / 'broken.png'})"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in records if "error" in r] and len(records) == 6
    good = [r for r in records if "top" in r]
    assert [r["top"][0]["class"] for r in good] == [r[SINGLE_TASK].top[0][0] for r in expected]
    assert all(abs(r["top"][0]["score"] - e[SINGLE_TASK].top[0][1]) < 1e-5 for r, e in zip(good, expected))


def test_predict_refuses_bad_arguments_with_the_documented_statuses(demo_export, demo_bank_export, tmp_path, capsys):
    _, outcome = demo_export
    image = str(sorted((outcome.out_dir / "data" / "test").rglob("*.png"))[0])
    assert main(["predict", str(tmp_path), image]) == 2  # tmp_path holds no export
    assert "is not an export" in capsys.readouterr().err
    assert main(["predict", str(outcome.out_dir), str(tmp_path / "missing.png")]) == 2
    assert "image or folder not found" in capsys.readouterr().err
    assert main(["predict", str(demo_bank_export), image, "--task", "nope"]) == 2
    assert "has no task 'nope'" in capsys.readouterr().err
    assert main(["predict", str(outcome.out_dir), image, "--precision", "int8"]) == 2
    assert "has no int8 graph" in capsys.readouterr().err
