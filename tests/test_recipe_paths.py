"""Every path a recipe names is resolved against the recipe file's directory when the recipe is
read, and only that resolved path is used afterwards: from another working directory, the check
(`transmiter export --check`) and whatever reads the file find the file beside the recipe.

One case per path key of the schema (pipeline/recipe.py), for a single-task recipe and for the
tasks of a bank; each is loaded with the working directory elsewhere, its resolved path compared
with the file beside the recipe, and the file handed to the code the export reads it with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.cli import main
from transmiter_deploy.pipeline.recipe import RecipeError, load_recipe
from transmiter_deploy.pipeline.teacher_specs import images_path

from conftest import COLOURS, make_image_folder

CLASSES = list(COLOURS)  # red, green, blue, yellow
TEMPLATES = ("a photo of a {}.", "a picture of a {}.")
AUXILIARY = ("lamp", "chair", "cloud")
PREPROCESS = {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}

# every path key of a single-task recipe, each naming a file or folder beside the recipe
SINGLE = """\
name: paths
source: {name: TM-Demo-Source, checkpoint: source.safetensors}
finetuned: {name: TM-Demo-Source, checkpoint: teacher.safetensors}
target: {name: TM-Demo-Target, checkpoint: target.safetensors}
data: {train: train, fewshot: fewshot, test: test, classes_file: classes.txt}
head: {templates: templates.txt, auxiliary_vocabulary: auxiliary.txt}
export: {calibration: {data: calibration}}
"""
ONNX_TEACHER = "finetuned: {onnx: teacher.onnx}"  # its preprocessing: teacher.onnx.json beside it
LOGITS_TEACHER = "finetuned: {logits: logits.npy, images: rows.json}"
SIDECAR_LOGITS_TEACHER = "finetuned: {logits: logits.npy}"  # its image list: logits.npy.json beside it

# a bank: data defaults at the top level (merged into each task), a teacher of each kind
BANK = """\
name: paths-bank
source: {name: TM-Demo-Source, checkpoint: source.safetensors}
target: {name: TM-Demo-Target, checkpoint: target.safetensors}
data: {train: train, classes_file: classes.txt}
tasks:
  - name: a
    finetuned: {name: TM-Demo-Source, checkpoint: teacher.safetensors}
    data: {fewshot: fewshot, test: test}
    head: {templates: templates.txt, auxiliary_vocabulary: auxiliary.txt}
  - name: b
    finetuned: {onnx: teacher.onnx}
    data: {fewshot: fewshot}
  - name: c
    finetuned: {logits: logits.npy, images: rows.json}
    data: {fewshot: fewshot}
"""
VARIANTS = {
    "single": SINGLE,
    "onnx": SINGLE.replace("finetuned: {name: TM-Demo-Source, checkpoint: teacher.safetensors}", ONNX_TEACHER),
    "logits": SINGLE.replace("finetuned: {name: TM-Demo-Source, checkpoint: teacher.safetensors}", LOGITS_TEACHER),
    "sidecar": SINGLE.replace("finetuned: {name: TM-Demo-Source, checkpoint: teacher.safetensors}",
                              SIDECAR_LOGITS_TEACHER),
    "bank": BANK,
}


def tiny_onnx_teacher(path: Path) -> None:
    """Pixels (N, 3, 8, 8) -> (N, 4) logits: one MatMul, enough for ONNX Runtime to run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((3 * 8 * 8, len(CLASSES))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "teacher", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """A folder holding the recipes and every file they name, under the names they give."""
    from transmiter_deploy.demo.weights import shipped_weights_dir

    root = tmp_path_factory.mktemp("recipe-paths") / "recipes"
    for split in ("train", "fewshot", "test", "calibration"):
        make_image_folder(root / split, per_class=2)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "auxiliary.txt").write_text("\n".join(AUXILIARY) + "\n")
    weights = shipped_weights_dir()
    for name, model in (("source", "TM-Demo-Source"), ("teacher", "TM-Demo-Source-ft-colours-tinted"),
                        ("target", "TM-Demo-Target")):
        (root / f"{name}.safetensors").symlink_to(weights / f"{model}.safetensors")
    tiny_onnx_teacher(root / "teacher.onnx")
    (root / "teacher.onnx.json").write_text(json.dumps({"preprocess": PREPROCESS}))
    train = sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.png"))
    np.save(root / "logits.npy", np.random.default_rng(1).standard_normal((len(train), len(CLASSES))).astype(np.float32))
    rows = {"class_names": CLASSES, "images": [{"split": "train", "path": path,
                                               "sha256": sha256_file(root / "train" / path)} for path in train]}
    for listing in ("rows.json", "logits.npy.json"):
        (root / listing).write_text(json.dumps(rows))
    for variant, text in VARIANTS.items():
        (root / f"{variant}.yaml").write_text(text)
    return root


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory of the test: an empty folder that is not the recipe's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def task(recipe, name: str | None = None):
    return recipe.tasks[0] if name is None else next(t for t in recipe.tasks if t.name == name)


# ----------------------------------------------------------------------------- what reads each file


def loads_checkpoint(ref) -> None:
    from transmiter_deploy.features.models import ModelSpec, load_model

    model = load_model(ModelSpec(ref.name, checkpoint=ref.checkpoint))
    assert model.identity.checkpoint_sha256 == sha256_file(ref.checkpoint)


def opens_images(path: Path) -> None:
    from transmiter_deploy.features.datasets import open_dataset

    assert open_dataset(path, CLASSES).class_names == CLASSES


def lists_lines(path: Path, expected) -> None:
    # how the export reads data.classes_file and head.auxiliary_vocabulary (pipeline/export.py)
    assert tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) == tuple(expected)


def reads_templates(value: str) -> None:
    from transmiter_deploy.features.templates import resolve_templates  # what the export's heads are built with

    assert resolve_templates(value) == TEMPLATES


def runs_onnx_teacher(recipe, ref) -> None:
    from transmiter_deploy.features.datasets import open_dataset
    from transmiter_deploy.pipeline.teachers import onnx_teacher_logits, teacher_key

    key = teacher_key(ref)  # reads the graph and, with no preprocessing in the recipe, its manifest
    assert key["preprocess"]["image_size"] == PREPROCESS["image_size"]
    logits = onnx_teacher_logits(ref, open_dataset(task(recipe).data.train, CLASSES), len(CLASSES), key,
                                 progress=False)
    assert logits.logits.shape == (2 * len(CLASSES), len(CLASSES))


def matches_logits(recipe, ref) -> None:
    from transmiter_deploy.features.datasets import open_dataset
    from transmiter_deploy.pipeline.teachers import match_precomputed, read_precomputed, teacher_key

    train = open_dataset(task(recipe).data.train, CLASSES)
    matched = match_precomputed(read_precomputed(ref, CLASSES), {"train": train}, teacher_key(ref))
    assert matched["train"].logits.shape == (len(train), len(CLASSES))


def teacher_of(recipe, name: str | None = None):
    return task(recipe, name).finetuned


# (variant, key as errors name it, the file beside the recipe, its resolved value, what reads it)
CASES = [
    ("single", "source.checkpoint", "source.safetensors", lambda r: r.source.checkpoint,
     lambda r: loads_checkpoint(r.source)),
    ("single", "target.checkpoint", "target.safetensors", lambda r: r.target.checkpoint,
     lambda r: loads_checkpoint(r.target)),
    ("single", "finetuned.checkpoint", "teacher.safetensors", lambda r: r.finetuned.checkpoint,
     lambda r: loads_checkpoint(r.finetuned)),
    ("onnx", "finetuned.onnx", "teacher.onnx", lambda r: r.finetuned.onnx,
     lambda r: runs_onnx_teacher(r, r.finetuned)),
    ("logits", "finetuned.logits", "logits.npy", lambda r: r.finetuned.logits,
     lambda r: matches_logits(r, r.finetuned)),
    ("logits", "finetuned.images", "rows.json", lambda r: r.finetuned.images,
     lambda r: matches_logits(r, r.finetuned)),
    ("sidecar", "finetuned.logits (its image list beside it)", "logits.npy.json",
     lambda r: images_path(r.finetuned),
     lambda r: matches_logits(r, r.finetuned)),
    ("single", "data.train", "train", lambda r: r.data.train, lambda r: opens_images(r.data.train)),
    ("single", "data.fewshot", "fewshot", lambda r: r.data.fewshot, lambda r: opens_images(r.data.fewshot)),
    ("single", "data.test", "test", lambda r: r.data.test, lambda r: opens_images(r.data.test)),
    ("single", "data.classes_file", "classes.txt", lambda r: r.data.classes_file,
     lambda r: lists_lines(r.data.classes_file, CLASSES)),
    ("single", "head.templates", "templates.txt", lambda r: Path(r.head.templates),
     lambda r: reads_templates(r.head.templates)),
    ("single", "head.auxiliary_vocabulary", "auxiliary.txt", lambda r: r.head.auxiliary_vocabulary,
     lambda r: lists_lines(r.head.auxiliary_vocabulary, AUXILIARY)),
    ("single", "export.calibration.data", "calibration", lambda r: r.export.calibration.data,
     lambda r: opens_images(r.export.calibration.data)),
    ("bank", "source.checkpoint", "source.safetensors", lambda r: r.source.checkpoint,
     lambda r: loads_checkpoint(r.source)),
    ("bank", "target.checkpoint", "target.safetensors", lambda r: r.target.checkpoint,
     lambda r: loads_checkpoint(r.target)),
    ("bank", "tasks.a.finetuned.checkpoint", "teacher.safetensors", lambda r: teacher_of(r, "a").checkpoint,
     lambda r: loads_checkpoint(teacher_of(r, "a"))),
    ("bank", "tasks.b.finetuned.onnx", "teacher.onnx", lambda r: teacher_of(r, "b").onnx,
     lambda r: runs_onnx_teacher(r, teacher_of(r, "b"))),
    ("bank", "tasks.c.finetuned.logits", "logits.npy", lambda r: teacher_of(r, "c").logits,
     lambda r: matches_logits(r, teacher_of(r, "c"))),
    ("bank", "tasks.c.finetuned.images", "rows.json", lambda r: teacher_of(r, "c").images,
     lambda r: matches_logits(r, teacher_of(r, "c"))),
    ("bank", "tasks.a.data.train (the top level's)", "train", lambda r: task(r, "a").data.train,
     lambda r: opens_images(task(r, "a").data.train)),
    ("bank", "tasks.a.data.classes_file (the top level's)", "classes.txt", lambda r: task(r, "a").data.classes_file,
     lambda r: lists_lines(task(r, "a").data.classes_file, CLASSES)),
    ("bank", "tasks.a.data.fewshot", "fewshot", lambda r: task(r, "a").data.fewshot,
     lambda r: opens_images(task(r, "a").data.fewshot)),
    ("bank", "tasks.a.data.test", "test", lambda r: task(r, "a").data.test,
     lambda r: opens_images(task(r, "a").data.test)),
    ("bank", "tasks.a.head.templates", "templates.txt", lambda r: Path(task(r, "a").head.templates),
     lambda r: reads_templates(task(r, "a").head.templates)),
    ("bank", "tasks.a.head.auxiliary_vocabulary", "auxiliary.txt", lambda r: task(r, "a").head.auxiliary_vocabulary,
     lambda r: lists_lines(task(r, "a").head.auxiliary_vocabulary, AUXILIARY)),
]


@pytest.mark.parametrize("variant, key, name, resolved, consume", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_each_path_key_names_the_file_beside_the_recipe_from_any_directory(recipe_dir, elsewhere, capsys, variant,
                                                                           key, name, resolved, consume):
    path = recipe_dir / f"{variant}.yaml"
    assert main(["--quiet", "export", "--check", str(path)]) == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out
    recipe = load_recipe(path)
    value = resolved(recipe)
    assert value.is_absolute() and value == recipe_dir / name, key
    consume(recipe)  # read where the export reads it, with the working directory still elsewhere
    assert os.getcwd() == str(elsewhere) and not list(elsewhere.iterdir())


def test_a_recipe_named_by_a_relative_path_resolves_to_absolute_paths(recipe_dir, elsewhere, monkeypatch):
    """Paths are made absolute when read: a later change of directory does not move them."""
    monkeypatch.chdir(recipe_dir.parent)
    recipe = load_recipe(Path(recipe_dir.name) / "single.yaml")
    assert recipe.data.train == recipe_dir / "train" and recipe.head.templates == str(recipe_dir / "templates.txt")
    monkeypatch.chdir(elsewhere)
    opens_images(recipe.data.train)
    reads_templates(recipe.head.templates)


def test_templates_keep_a_built_in_name_and_refuse_a_file_only_in_the_working_directory(recipe_dir, elsewhere,
                                                                                        tmp_path_factory):
    own = tmp_path_factory.mktemp("own-recipe")
    (elsewhere / "templates.txt").write_text("a photo of a {}.\n")  # beside the cwd, not the recipe
    for name in ("train", "fewshot"):
        (own / name).symlink_to(recipe_dir / name)
    text = SINGLE.replace("source.safetensors", str(recipe_dir / "source.safetensors")).replace(
        "teacher.safetensors", str(recipe_dir / "teacher.safetensors")).replace(
        "target.safetensors", str(recipe_dir / "target.safetensors")).replace(
        "data: {train: train, fewshot: fewshot, test: test, classes_file: classes.txt}",
        "data: {train: train, fewshot: fewshot, classes: [red, green, blue, yellow]}").replace(
        "head: {templates: templates.txt, auxiliary_vocabulary: auxiliary.txt}\n", "head: {templates: HEAD}\n").replace(
        "export: {calibration: {data: calibration}}\n", "")
    (own / "photo").write_text("a {} photo\n")  # a file named like a built-in set: the set wins, as before
    (own / "r.yaml").write_text(text.replace("HEAD", "photo"))
    assert load_recipe(own / "r.yaml").head.templates == "photo"
    (own / "r.yaml").write_text(text.replace("HEAD", "templates.txt"))
    with pytest.raises(RecipeError, match=r"head\.templates: 'templates\.txt' is neither a built-in set "
                                          r"\(simple, openai, photo\) nor a file \(looked for .*own-recipe\d*/templates\.txt\)$"):
        load_recipe(own / "r.yaml")
    (own / "r.yaml").write_text(text.replace("HEAD", str(elsewhere / "templates.txt")))  # absolute: as written
    assert load_recipe(own / "r.yaml").head.templates == str(elsewhere / "templates.txt")


def test_the_export_reads_the_recipes_files_from_another_directory(recipe_dir, elsewhere, capsys):
    """What the export computes from a recipe's data, classes, templates and teacher checkpoint,
    through the export's own code (`transmiter teacher logits`, pipeline/teacher_files.py): it
    ran from the recipe's folder only before paths were resolved when the recipe is read (its
    check passed, then the export read head.templates against the working directory, exit 2)."""
    out = elsewhere / "teacher.npy"
    code = main(["--quiet", "teacher", "logits", str(recipe_dir / "single.yaml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((elsewhere / "teacher.npy.json").read_text())["images"]
    assert {row["split"] for row in rows} == {"train", "fewshot", "test"}
    assert np.load(out).shape == (len(rows), len(CLASSES))
