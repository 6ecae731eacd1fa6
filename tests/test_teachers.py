"""Teacher kinds (an ONNX classifier, precomputed logits) and the teacher check in every export.

The demo teacher (the small demo recipe's fine-tuned TM-Demo-Source) is written out by
`transmiter teacher onnx|logits` and used as each kind: the exports must match the checkpoint
teacher's (``demo_export``). Bad teacher files are refused in one line, exit 2, before any
artifact is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transmiter_deploy.artifacts import load_tensors, save_tensors, sha256_file
from transmiter_deploy.cli import main
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.adapter_artifact import load_adapter
from transmiter_deploy.features.cache import load_cache, zero_shot_logits
from transmiter_deploy.features.datasets import open_dataset
from transmiter_deploy.features.heads import load_head
from transmiter_deploy.features.teacher_logits import load_teacher_logits
from transmiter_deploy.pipeline.export import run_export
from transmiter_deploy.pipeline.recipe import RecipeError, load_recipe
from transmiter_deploy.pipeline.teacher_specs import LogitsTeacher, OnnxTeacher, TeacherPreprocess
from transmiter_deploy.pipeline.teachers import match_precomputed, onnx_teacher_logits, read_precomputed

from conftest import SMALL_DEMO, bank_recipe_text, copy_tree

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_TEACHER = "finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}"
# the exports compared here need the adapter and the accuracy table only: one precision, one runtime
FAST_EXPORT = "export: {precisions: [fp32], batch: {min: 1, opt: 4, max: 8}}\nruntimes: [onnxruntime]\n"
LOGITS_TOLERANCE = 1e-5  # ONNX Runtime against PyTorch, in logit units


def recipe_text(teacher: str) -> str:
    text = SMALL_DEMO.replace(CHECKPOINT_TEACHER, f"finetuned: {teacher}")
    return text.replace("export: {precisions: [fp32, fp16], batch: {min: 1, opt: 4, max: 8}}\n", FAST_EXPORT)


def export(root: Path, teacher: str, out: str, seed: Path | None = None):
    """The small demo recipe with ``teacher``, exported into ``root / out`` (which starts as a copy
    of ``seed``, an export of the same data: its data, source and target steps are then skipped)."""
    path = root / f"{out}.yaml"
    path.write_text(recipe_text(teacher))
    if seed is not None:
        copy_tree(seed, root / out)
    return run_export(load_recipe(path), root / out, progress=False, log=lambda _: None)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory, demo_export):
    """The small demo recipe's teacher as an ONNX graph and as precomputed logits, written by the
    CLI; its work directory is a copy of the checkpoint teacher's export, whose rendered demo
    images it reuses (the same data step)."""
    root = tmp_path_factory.mktemp("teachers")
    (root / "checkpoint.yaml").write_text(SMALL_DEMO)
    work = copy_tree(demo_export[1].out_dir, root / "work")
    for kind, name in (("onnx", "teacher.onnx"), ("logits", "teacher.safetensors")):
        assert main(["--quiet", "teacher", kind, str(root / "checkpoint.yaml"), "--out", str(root / "files" / name),
                     "--work", str(work)]) == 0
    return root


@pytest.fixture(scope="module")
def onnx_export(teacher_files, demo_export):
    return export(teacher_files, "{onnx: files/teacher.onnx}", "out-onnx", seed=demo_export[1].out_dir)


@pytest.fixture(scope="module")
def logits_export(teacher_files, demo_export):
    return export(teacher_files, "{logits: files/teacher.safetensors}", "out-logits", seed=demo_export[1].out_dir)


def checkpoint_logits(out: Path, split: str) -> torch.Tensor:
    head = load_head(out / "heads" / "teacher")
    return zero_shot_logits(load_cache(out / "caches" / f"teacher-{split}"), head)[:, : head.num_task_classes]


def assert_same_extraction(out: Path, reference: Path, atol: float) -> None:
    got = load_adapter(out / "adapters" / "extracted").adapter.state_dict()
    want = load_adapter(reference / "adapters" / "extracted").adapter.state_dict()
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- the two kinds


def test_an_onnx_teacher_gives_the_checkpoint_teachers_logits_adapter_and_table(demo_export, onnx_export):
    _, reference = demo_export
    out = onnx_export.out_dir
    for split in ("train", "fewshot", "test"):
        onnx = load_teacher_logits(out / "caches" / f"teacher-logits-{split}")
        assert onnx.teacher["kind"] == "onnx" and onnx.teacher["onnx_sha256"] == sha256_file(
            out.parent / "files" / "teacher.onnx")
        assert onnx.fingerprint == load_cache(reference.out_dir / "caches" / f"target-{split}").fingerprint
        difference = float((onnx.logits - checkpoint_logits(reference.out_dir, split)).abs().max())
        assert difference <= LOGITS_TOLERANCE, f"{split}: ONNX teacher logits differ by {difference:.2e}"
    assert_same_extraction(out, reference.out_dir, atol=1e-5)
    assert onnx_export.accuracy == reference.accuracy
    provenance = load_adapter(out / "adapters" / "extracted").provenance["extraction"]
    assert provenance["teacher"]["kind"] == "onnx"
    ran = {step.name: step.status for step in onnx_export.steps}
    assert "head-teacher" not in ran  # an ONNX teacher has no zero-shot head
    assert ran["cache-teacher-train"] == ran["extract"] == "ran" and ran["cache-source-train"] == "skipped"


def test_precomputed_logits_reproduce_the_checkpoint_teacher_exactly(demo_export, logits_export):
    _, reference = demo_export
    out = logits_export.out_dir
    for split in ("train", "fewshot", "test"):
        torch.testing.assert_close(load_teacher_logits(out / "caches" / f"teacher-logits-{split}").logits,
                                   checkpoint_logits(reference.out_dir, split), rtol=0, atol=0)
    assert_same_extraction(out, reference.out_dir, atol=0)
    assert logits_export.accuracy == reference.accuracy
    assert logits_export.teacher_check["sets"] == reference.teacher_check["sets"]


def test_precomputed_rows_are_matched_by_image_not_position_and_a_changed_file_redoes_its_steps(
        logits_export, tmp_path):
    """The same logits in another row order: the file changed, so every step that reads the
    teacher runs again, and gives the same adapter; the source and target steps are skipped."""
    root = copy_tree(logits_export.out_dir.parent, tmp_path / "copy")
    data, listing = root / "files" / "teacher.safetensors", root / "files" / "teacher.safetensors.json"
    logits = load_tensors(data, None, "logits")["logits"]
    images = json.loads(listing.read_text())
    order = np.random.default_rng(0).permutation(len(logits))
    images["images"] = [images["images"][i] for i in order]
    images["logits_sha256"] = save_tensors(data, {"logits": logits[order]})
    listing.write_text(json.dumps(images))

    again = export(root, "{logits: files/teacher.safetensors}", "out-logits")
    ran = {step.name: step.status for step in again.steps}
    assert ran["cache-teacher-train"] == ran["cache-teacher-test"] == ran["extract"] == "ran"
    assert ran["cache-source-train"] == ran["cache-target-train"] == ran["head-target"] == "skipped"
    assert_same_extraction(again.out_dir, logits_export.out_dir, atol=0)
    assert again.accuracy == logits_export.accuracy


# ----------------------------------------------------------------------------- the teacher check


def accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: range) -> float:
    """Accuracy (%) over images of ``classes``, argmax among them: recomputed here, by hand."""
    keep = [i for i, label in enumerate(labels.tolist()) if label in classes]
    hits = sum(int(logits[i, classes.start:classes.stop].argmax()) + classes.start == int(labels[i]) for i in keep)
    return 100.0 * hits / len(keep)


def test_the_demo_report_has_the_teacher_check_with_numbers_from_the_caches(demo_export):
    recipe, outcome = demo_export
    out = outcome.out_dir
    target_head = load_head(out / "heads" / "target")
    adapter = load_adapter(out / "adapters" / "transferred").adapter
    k = target_head.num_task_classes
    report = json.loads((out / "report.json").read_text())["teacher_check"]
    assert [entry["images"] for entry in report["sets"]] == ["few-shot", "test"]
    for entry, split in zip(report["sets"], ("fewshot", "test")):
        cache = load_cache(out / "caches" / f"target-{split}")
        target = zero_shot_logits(cache, target_head)
        with torch.no_grad():
            expected = {"teacher (fine-tuned)": checkpoint_logits(out, split), "target zero-shot": target[:, :k],
                        "target + TransMiter": adapter.task_logits(target)}
        assert entry["samples"] == len(cache)
        for row in entry["rows"]:
            for scope, classes in (("base", range(0, 4)), ("novel", range(4, k)), ("all", range(0, k))):
                assert row[scope] == pytest.approx(accuracy(expected[row["model"]], cache.labels, classes))
    teacher, target = report["sets"][0]["rows"][0]["base"], report["sets"][0]["rows"][1]["base"]
    difference = report["difference"]  # teacher minus target, image by image, on the 8 base-class few-shot images
    assert teacher > target and difference["low"] < teacher - target < difference["high"]
    # the teacher is ahead, but 8 images cannot tell: the interval holds 0 (the shipped recipe's 16 can)
    assert difference["images"] == 8 and difference["low"] < 0 < difference["high"]
    assert report["transfer_likely_helps"] is None and report["warning"] is None
    assert report["summary"].startswith("cannot tell with 8 images whether transfer helps")
    text = (out / "report.md").read_text()
    assert "## Teacher check: will transfer help?" in text and f"teacher {teacher:.1f}% vs target zero-shot" in text
    assert "unlikely to help" not in text


def test_a_noise_teacher_warns_that_transfer_is_unlikely_to_help_and_still_exports(logits_export, tmp_path, capsys):
    """Noise logits without test rows: the CLI and the report warn (decided on the few-shot
    images), the table says the fine-tuned row is not available, the artifacts are written."""
    root = copy_tree(logits_export.out_dir.parent, tmp_path / "copy")
    data, listing = root / "files" / "teacher.safetensors", root / "files" / "teacher.safetensors.json"
    images = json.loads(listing.read_text())
    keep = [i for i, entry in enumerate(images["images"]) if entry["split"] != "test"]
    noise = torch.randn(len(keep), 8, generator=torch.Generator().manual_seed(0))
    images["images"] = [images["images"][i] for i in keep]
    images["logits_sha256"] = save_tensors(data, {"logits": noise})
    listing.write_text(json.dumps(images))
    (root / "noise.yaml").write_text(recipe_text("{logits: files/teacher.safetensors}"))

    code, out, err = run_cli(["export", str(root / "noise.yaml"), "--out", str(root / "out-logits")], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings and "transfer is unlikely to help" in warnings[-1] and "TransMiter+" in warnings[-1]
    assert "few-shot images" in warnings[-1]
    report = json.loads((root / "out-logits" / "report.json").read_text())
    check = report["teacher_check"]
    assert check["transfer_likely_helps"] is False and check["decided_on"] == "few-shot"
    teacher_row, target_row = check["sets"][0]["rows"][:2]
    assert teacher_row["base"] <= target_row["base"]
    assert check["sets"][1]["rows"][0]["note"].startswith("not available")
    fine_tuned = next(row for row in report["accuracy"] if row["model"] == "source fine-tuned")
    assert fine_tuned["all"] is None and "no rows for the test images" in fine_tuned["note"]
    text = (root / "out-logits" / "report.md").read_text()
    assert "**Warning: transfer is unlikely to help" in text and "source fine-tuned: not available" in text
    assert (root / "out-logits" / "onnx" / "manifest.json").is_file()


# ----------------------------------------------------------------------------- bad teachers


@pytest.fixture()
def bad_logits(logits_export, tmp_path):
    """A copy of the precomputed-logits export and an editor of its teacher files."""
    root = copy_tree(logits_export.out_dir.parent, tmp_path / "copy")
    data, listing = root / "files" / "teacher.safetensors", root / "files" / "teacher.safetensors.json"

    def edit(change):
        logits = load_tensors(data, None, "logits")["logits"]
        images = json.loads(listing.read_text())
        logits, images["images"] = change(logits, images["images"])
        images["logits_sha256"] = save_tensors(data, {"logits": logits})
        listing.write_text(json.dumps(images))
        return images["images"]

    return root, edit


def test_a_precomputed_file_missing_a_test_image_fails_in_one_line_before_anything_is_written(bad_logits, capsys):
    root, edit = bad_logits
    before = {path: sha256_file(path) for path in (root / "out-logits").rglob("*") if path.is_file()
              and ".steps" not in path.parts}
    first_test = next(i for i, entry in enumerate(edit(lambda l, i: (l, i))) if entry["split"] == "test")
    dropped = edit(lambda l, i: (l, i))[first_test]
    edit(lambda logits, images: (torch.cat([logits[:first_test], logits[first_test + 1:]]),
                                 images[:first_test] + images[first_test + 1:]))
    (root / "bad.yaml").write_text(recipe_text("{logits: files/teacher.safetensors}"))
    code, _, err = run_cli(["export", str(root / "bad.yaml"), "--out", str(root / "out-logits")], capsys)
    errors = [line for line in err.splitlines() if not line.startswith("[")]  # less the step log
    assert code == 2 and len(errors) == 1, err
    assert f"have no row for image test/{dropped['path']} of the dataset (missing)" in errors[0]
    after = {path: sha256_file(path) for path in (root / "out-logits").rglob("*") if path.is_file()
             and ".steps" not in path.parts}
    assert after == before  # the training split matched, but nothing was written: every split is checked first


def split_datasets(out: Path) -> dict:
    classes = load_cache(out / "caches" / "target-train").class_names
    return {split: open_dataset(out / "data" / split, classes) for split in ("train", "fewshot", "test")}, classes


@pytest.mark.parametrize("problem, expected", [
    ("extra", "which is not in the dataset (extra"),
    ("swapped", "is not the one its row was computed for"),
    ("classes", "9 logits per image, but the task has 8 classes"),
    ("nan", "NaN/inf logits in 1 rows (first: image train/"),
    ("rows", "has 399 images but"),
    ("tampered", "do not match the sha256 in their image list"),
])
def test_bad_precomputed_logits_are_refused_naming_the_first_problem(bad_logits, problem, expected):
    root, edit = bad_logits
    datasets, classes = split_datasets(root / "out-logits")
    if problem == "extra":
        edit(lambda l, i: (torch.cat([l, l[:1]]), i + [{**i[0], "path": "red/extra.png"}]))
    elif problem == "swapped":  # two rows listed against each other's images
        edit(lambda l, i: (l, [{**i[1], "sha256": i[0]["sha256"]}, {**i[0], "sha256": i[1]["sha256"]}, *i[2:]]))
    elif problem == "classes":
        edit(lambda l, i: (torch.cat([l, l[:, :1]], dim=1), i))
    elif problem == "nan":
        edit(lambda l, i: (l.index_put((torch.tensor([5]), torch.tensor([2])), torch.tensor(float("nan"))), i))
    elif problem == "rows":
        edit(lambda l, i: (l, i[:-1]))
    else:
        save_tensors(root / "files" / "teacher.safetensors", {"logits": torch.zeros(400, 8)})
    ref = LogitsTeacher(root / "files" / "teacher.safetensors")
    with pytest.raises(InputError) as caught:
        match_precomputed(read_precomputed(ref, classes), datasets, {"kind": "logits"})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, IntegrityError) == (problem == "tampered")


def test_a_precomputed_file_without_training_rows_is_refused(bad_logits):
    root, edit = bad_logits
    datasets, classes = split_datasets(root / "out-logits")
    keep = lambda l, i: (l[[n for n, e in enumerate(i) if e["split"] != "train"]],  # noqa: E731
                         [e for e in i if e["split"] != "train"])
    edit(keep)
    with pytest.raises(InputError, match="no rows for the training images"):
        match_precomputed(read_precomputed(LogitsTeacher(root / "files" / "teacher.safetensors"), classes),
                          datasets, {"kind": "logits"})


class TinyClassifier(torch.nn.Module):
    """Pixels to ``width`` logits: a stand-in for a teacher from another framework."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, width)

    def forward(self, pixels):
        return self.fc(self.conv(pixels).mean(dim=(2, 3)))


def tiny_onnx(path: Path, width: int, size: int, dynamic_size: bool = False) -> Path:
    axes = {"pixels": {0: "batch", **({2: "h", 3: "w"} if dynamic_size else {})}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(TinyClassifier(width).eval(), (torch.zeros(2, 3, size, size),), str(path), dynamo=False,
                          input_names=["pixels"], output_names=["logits"], dynamic_axes=axes)
    return path


PREPROCESS = TeacherPreprocess(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("width, size, expected", [
    (7, 48, "outputs 7 logits per image, but the task has 8 classes"),
    (8, 32, "takes (N, 3, 32, 32) images but its stated preprocessing makes 48x48"),
])
def test_an_onnx_teacher_that_does_not_fit_the_task_is_refused(tmp_path, image_folder, width, size, expected):
    graph = tiny_onnx(tmp_path / "tiny.onnx", width, size)
    dataset = open_dataset(image_folder)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        onnx_teacher_logits(OnnxTeacher(graph, PREPROCESS), dataset, 8, {"kind": "onnx"}, progress=False)


def test_an_onnx_teacher_from_another_framework_runs_with_its_stated_preprocessing(tmp_path, image_folder):
    """A graph with a free image size and the recipe's preprocessing: pixels made as stated."""
    from transmiter_deploy.pipeline.teachers import pixel_transform
    from transmiter_deploy.runtimes.onnxruntime import ort_session, run_session

    graph = tiny_onnx(tmp_path / "tiny.onnx", 4, 48, dynamic_size=True)
    dataset = open_dataset(image_folder)
    got = onnx_teacher_logits(OnnxTeacher(graph, PREPROCESS), dataset, 4, {"kind": "onnx"}, progress=False)
    transform = pixel_transform(PREPROCESS)
    pixels = torch.stack([transform(Image.open(record.path).convert("RGB")) for record in dataset.records])
    assert tuple(pixels.shape[1:]) == (3, 48, 48)
    np.testing.assert_allclose(got.logits.numpy(), run_session(ort_session(graph), pixels.numpy()), rtol=0, atol=1e-6)
    assert got.labels.tolist() == [record.label for record in dataset.records]


# ----------------------------------------------------------------------------- recipes


def test_recipes_name_a_teacher_of_each_kind_and_refuse_bad_ones(tmp_path):
    (tmp_path / "t.onnx").write_bytes(b"x")
    (tmp_path / "l.npy").write_bytes(b"x")
    (tmp_path / "l.npy.json").write_text("{}")

    def load(teacher: str):
        path = tmp_path / "r.yaml"
        path.write_text(SMALL_DEMO.replace(CHECKPOINT_TEACHER, f"finetuned: {teacher}"))
        return load_recipe(path)

    onnx = load("{onnx: t.onnx, preprocess: {image_size: 48, mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}}")
    assert onnx.finetuned == OnnxTeacher(tmp_path / "t.onnx", TeacherPreprocess(48, (0.5,) * 3, (0.2,) * 3))
    assert load("{logits: l.npy}").finetuned == LogitsTeacher(tmp_path / "l.npy")
    bank = tmp_path / "bank.yaml"  # a bank's tasks may each have a teacher of any kind
    bank.write_text(bank_recipe_text().replace(
        "finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-textures-foggy}",
        "finetuned: {logits: l.npy, images: l.npy.json}"))
    tasks = load_recipe(bank).tasks
    assert tasks[0].finetuned.demo_weights == "TM-Demo-Source-ft-colours-tinted"
    assert tasks[1].finetuned == LogitsTeacher(tmp_path / "l.npy", tmp_path / "l.npy.json")
    for teacher, message in [
        ("{onnx: t.onnx, logits: l.npy}", "give one teacher kind, not both onnx and logits"),
        ("{onnx: missing.onnx}", "finetuned.onnx: file not found"),
        ("{logits: l.csv}", "must be a .safetensors or .npy file"),
        ("{logits: l.npy, images: nowhere.json}", "finetuned.images: file not found"),
        ("{onnx: t.onnx, preprocess: {image_size: 48, mean: [0.5], std: [1, 1, 1]}}", "mean must be 3 finite numbers"),
        ("{onnx: t.onnx, preprocess: {image_size: 48, mean: [0, 0, 0], std: [1, 0, 1]}}", "std must be positive"),
        ("{onnx: t.onnx, preprocess: {image_size: 48, mean: [0, 0, 0], std: [1, 1, 1], resize_mode: crop}}",
         "resize_mode must be one of"),
        ("{onnx: t.onnx, preprocesss: {}}", "did you mean 'preprocess'"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load(teacher)


def test_the_shipped_teacher_recipes_read_what_make_demo_teachers_writes():
    makefile = (REPO / "Makefile").read_text()
    onnx = load_recipe(REPO / "export" / "recipes" / "demo-onnx-teacher.yaml", check_files=False)
    logits = load_recipe(REPO / "export" / "recipes" / "demo-logits-teacher.yaml", check_files=False)
    demo = load_recipe(REPO / "export" / "recipes" / "demo.yaml")
    assert onnx.finetuned.onnx.resolve() == REPO / "export" / "teachers" / "demo-teacher.onnx"
    assert logits.finetuned.logits.resolve() == REPO / "export" / "teachers" / "demo-teacher-logits.safetensors"
    assert "teacher onnx export/recipes/demo.yaml --out $(DEMO_TEACHERS)/demo-teacher.onnx" in makefile
    assert "teacher logits export/recipes/demo.yaml --out $(DEMO_TEACHERS)/demo-teacher-logits.safetensors" in makefile
    assert "DEMO_TEACHERS ?= export/teachers" in makefile
    for recipe in (onnx, logits):  # everything but the teacher is demo.yaml's, so the results must agree
        assert (recipe.source, recipe.target, recipe.data, recipe.head, recipe.adapter, recipe.export) == (
            demo.source, demo.target, demo.data, demo.head, demo.adapter, demo.export)


def test_teacher_commands_need_an_open_clip_teacher(teacher_files, logits_export, capsys):
    code, _, err = run_cli(["teacher", "onnx", str(teacher_files / "out-logits.yaml"), "--out",
                            str(teacher_files / "x.onnx")], capsys)
    assert code == 2 and "finetuned must be an open_clip model" in err and len(err.strip().splitlines()) == 1
    assert not (teacher_files / "x.onnx").exists()


def test_a_bank_report_has_a_teacher_check_per_task(demo_bank_export):
    report = json.loads((demo_bank_export / "report.json").read_text())
    assert list(report["task_teacher_check"]) == ["colours_tinted", "textures_foggy"]
    text = (demo_bank_export / "report.md").read_text()
    for task, check in report["task_teacher_check"].items():
        assert check["decided_on"] == "few-shot" and [entry["images"] for entry in check["sets"]] == ["few-shot", "test"]
        recorded = json.loads((demo_bank_export / "tasks" / task / "teacher_check.json").read_text())
        assert recorded == check and f"## Teacher check: task {task}" in text


def test_an_onnx_teacher_of_the_wrong_width_stops_the_export_in_one_line(demo_export, tmp_path, capsys):
    """Through the CLI: exit 2, one line naming the width; nothing of the teacher is written and
    the earlier adapter is unchanged."""
    out = copy_tree(demo_export[1].out_dir, tmp_path / "out")
    extracted = sha256_file(out / "adapters" / "extracted" / "adapter.safetensors")
    tiny_onnx(tmp_path / "tiny.onnx", 7, 48)
    (tmp_path / "r.yaml").write_text(recipe_text(
        "{onnx: tiny.onnx, preprocess: {image_size: 48, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}"))
    code, _, err = run_cli(["export", str(tmp_path / "r.yaml"), "--out", str(out)], capsys)
    errors = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(errors) == 1, err
    assert "outputs 7 logits per image, but the task has 8 classes" in errors[0]
    assert not (out / "caches" / "teacher-logits-train").exists()
    assert not list((out / "caches").glob(".*"))  # no staging left behind
    assert sha256_file(out / "adapters" / "extracted" / "adapter.safetensors") == extracted


def test_an_onnx_teacher_manifest_is_checked_against_its_graph(tmp_path):
    from transmiter_deploy.pipeline.teachers import resolve_preprocess

    graph = tiny_onnx(tmp_path / "t.onnx", 8, 48)
    manifest = {"preprocess": {"image_size": [48, 48], "mean": [0.5] * 3, "std": [0.25] * 3, "layout": "NCHW"},
                "onnx_sha256": sha256_file(graph)}
    (tmp_path / "t.onnx.json").write_text(json.dumps(manifest))
    assert resolve_preprocess(OnnxTeacher(graph)) == TeacherPreprocess(48, (0.5,) * 3, (0.25,) * 3)
    (tmp_path / "t.onnx.json").write_text(json.dumps({**manifest, "preprocess": {**manifest["preprocess"],
                                                                                 "layout": "NHWC"}}))
    with pytest.raises(InputError, match="layout 'NHWC' is not supported"):
        resolve_preprocess(OnnxTeacher(graph))
    (tmp_path / "t.onnx.json").write_text(json.dumps({**manifest, "onnx_sha256": "0" * 64}))
    with pytest.raises(IntegrityError, match="does not match the sha256 in its manifest"):
        resolve_preprocess(OnnxTeacher(graph))
    (tmp_path / "t.onnx.json").unlink()
    with pytest.raises(InputError, match="state its preprocessing in the recipe"):
        resolve_preprocess(OnnxTeacher(graph))


def test_the_verdict_is_taken_on_the_first_labelled_set_the_teacher_has_logits_on():
    from transmiter_deploy.pipeline.teacher_check import teacher_check

    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    right = torch.nn.functional.one_hot(labels, 4).float()  # every image right
    wrong = right.roll(1, dims=1)  # every image wrong
    sets = {"few-shot": {"labels": labels, "teacher": None, "teacher_unavailable": "no rows", "target": wrong,
                         "transmiter": right},
            "test": {"labels": labels, "teacher": right, "target": right, "transmiter": right}}
    tie = teacher_check(sets, num_base=2)  # a tie on 4 base-class images decides nothing
    assert tie["decided_on"] == "test" and tie["transfer_likely_helps"] is None and tie["warning"] is None
    assert tie["summary"].startswith("cannot tell with 4 images whether transfer helps (teacher 100.0% vs target "
                                     "zero-shot 100.0% on the base classes of the 6 test images; difference [")
    assert tie["sets"][0]["rows"][0]["note"] == "not available: no rows"
    sets["test"]["target"] = wrong  # 4 of 4 base images mended: the interval is above 0
    helps = teacher_check(sets, num_base=2)
    assert helps["transfer_likely_helps"] is True and helps["difference"]["low"] > 0
    sets["test"]["target"], sets["test"]["teacher"] = right, wrong  # 4 of 4 broken: below 0
    hurts = teacher_check(sets, num_base=2)
    assert hurts["transfer_likely_helps"] is False and hurts["difference"]["high"] < 0
    assert "transfer is unlikely to help" in hurts["warning"]
    few = {"test": {**sets["test"], "labels": labels[:1], "teacher": right[:1], "target": wrong[:1],
                    "transmiter": right[:1]}}
    assert teacher_check(few, num_base=2)["summary"].startswith("cannot tell with 1 image whether")
    unlabelled = {"few-shot": {**sets["few-shot"], "labels": torch.full((6,), -1)}}
    none = teacher_check(unlabelled, num_base=2)
    assert none["decided_on"] is None and none["warning"] is None and "not available" in none["summary"]
    assert none["sets"][0]["note"] == "no labelled images"


def test_a_bad_teacher_file_is_found_before_any_image_is_encoded(tmp_path, capsys):
    (tmp_path / "l.npy").write_bytes(b"not an npy file")
    (tmp_path / "l.npy.json").write_text(json.dumps({"images": []}))
    (tmp_path / "r.yaml").write_text(recipe_text("{logits: l.npy}"))
    code, _, err = run_cli(["export", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not a readable .npy file" in err
    assert not list((tmp_path / "out" / "caches").glob("*"))  # neither the source's nor the target's cache


def test_an_onnx_teachers_external_data_is_part_of_its_key(tmp_path):
    # a graph past 2 GiB keeps its weights in a data file beside it: changing them must redo the
    # teacher's steps as changing the graph does, and a missing one is named
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from transmiter_deploy.pipeline.teachers import teacher_key

    weight = np.random.default_rng(0).standard_normal((3 * 8 * 8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "teacher", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    preprocess = TeacherPreprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    onnx.save_model(model, tmp_path / "inline.onnx")
    assert "external_data_sha256" not in teacher_key(OnnxTeacher(tmp_path / "inline.onnx", preprocess))
    path = tmp_path / "t.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="t.onnx.data", size_threshold=0)
    ref = OnnxTeacher(path, preprocess)
    key = teacher_key(ref)
    assert key["external_data_sha256"] == {"t.onnx.data": sha256_file(tmp_path / "t.onnx.data")}
    data = bytearray((tmp_path / "t.onnx.data").read_bytes())
    data[0] ^= 0x01
    (tmp_path / "t.onnx.data").write_bytes(bytes(data))
    changed = teacher_key(ref)
    assert changed["onnx_sha256"] == key["onnx_sha256"] and changed != key
    (tmp_path / "t.onnx.data").unlink()
    with pytest.raises(InputError, match="external data file t.onnx.data is missing"):
        teacher_key(ref)


def test_an_upgrade_whose_teacher_file_is_gone_names_it_and_writes_nothing(logits_export, tmp_path, capsys):
    """An upgrade reuses the teacher's logits, keyed (as the export keyed them) by the teacher's
    files: a precomputed-logits file that is gone is named before anything is written."""
    origin = logits_export.out_dir.parent
    root = copy_tree(origin, tmp_path / "copy")
    out = root / logits_export.out_dir.name
    record = json.loads((out / "recipe.json").read_text())
    record["finetuned"] = {key: value.replace(str(origin), str(root)) for key, value in record["finetuned"].items()}
    (out / "recipe.json").write_text(json.dumps(record))
    (root / "files" / "teacher.safetensors").unlink()
    code, _, err = run_cli(["upgrade", str(out), "--target", "TM-Tiny-ViT", "--init-seed", "0",
                            "--out", str(tmp_path / "new")], capsys)
    assert code == 2 and "finetuned.logits: file not found" in err and "teacher.safetensors" in err, err
    assert not (tmp_path / "new").exists()
