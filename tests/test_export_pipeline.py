"""`transmiter export`: the demo recipe end to end on CPU, incremental re-runs, the lock."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from transmiter_deploy.cli import main
from transmiter_deploy.errors import InputError
from transmiter_deploy.pipeline.export import run_export
from transmiter_deploy.pipeline.steps import exclusive
from transmiter_deploy.pipeline.recipe import load_recipe

from conftest import SMALL_DEMO, copy_tree


TENSORRT_HERE = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def small_recipe(tmp_path: Path, text: str = SMALL_DEMO):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def statuses(outcome) -> dict[str, str]:
    return {step.name: step.status for step in outcome.steps}


@pytest.fixture(scope="module")
def first_run(demo_export):
    return demo_export


@pytest.fixture
def copied_run(first_run, tmp_path):
    """``(recipe, out)``: the session's demo export copied for a test that runs the export again
    (the session fixture stays as it was made: other modules read it)."""
    recipe, outcome = first_run
    return recipe, copy_tree(outcome.out_dir, tmp_path / "out")


def test_the_demo_recipe_runs_to_the_end_on_cpu(first_run):
    recipe, outcome = first_run
    out = outcome.out_dir
    ran = statuses(outcome)
    assert all(ran[name] == "ran" for name in ("data", "cache-target-train", "extract", "transfer", "plus", "onnx"))
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "head.onnx", "model_fp16.onnx", "head_fp16.onnx",
                                 "head.safetensors"}
    assert manifest["adapter"]["stage"] == "plus" and manifest["class_names"][0] == "red"
    report = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in report["accuracy"]] == ["source zero-shot", "source fine-tuned", "target zero-shot",
                                                           "target + TransMiter", "target + TransMiter+"]
    assert all(c["passed"] for c in report["parity"]["checks"].values() if c["required"])
    validated = {(row["candidate"], row["graph"]): row for row in report["validation"]}
    assert {("onnxruntime-cpu", "model.onnx"), ("onnxruntime-cpu", "model_fp16.onnx")} <= set(validated)
    assert all(row["passed"] for row in validated.values())
    assert validated["onnxruntime-cpu", "model.onnx"]["max_abs"] <= 1e-4
    markdown = (out / "report.md").read_text()
    assert "## Accuracy" in markdown and "## Parity" in markdown and "## Runtimes" in markdown
    assert "| onnx | ran |" in markdown
    plan = json.loads((out / "engines" / "model_fp16.engine.json").read_text())
    assert plan["onnx_sha256"] == manifest["files"]["model_fp16.onnx"]["sha256"]
    assert plan["input"]["shapes"] == {"min": [1, 3, 48, 48], "opt": [4, 3, 48, 48], "max": [8, 3, 48, 48]}
    if not TENSORRT_HERE:
        assert ran["tensorrt-model_fp16.onnx"] == ran["tensorrt-model.onnx"] == "unavailable"
        assert plan["built"] is False and plan["reason_not_built"]
        assert "--stronglyTyped" in plan["trtexec"] and "--maxShapes=pixel_values:8x3x48x48" in plan["trtexec"]


def test_a_rerun_skips_every_step_and_a_changed_setting_redoes_only_what_depends_on_it(first_run, copied_run,
                                                                                        tmp_path):
    _, outcome = first_run
    recipe, out = copied_run
    again = run_export(recipe, out, progress=False, log=lambda _: None)
    assert {status for name, status in statuses(again).items() if not name.startswith("tensorrt")} == {"skipped"}
    assert again.accuracy == outcome.accuracy

    changed = small_recipe(tmp_path, SMALL_DEMO.replace("regularisation: 500", "regularisation: 50"))
    redo = statuses(run_export(changed, out, progress=False, log=lambda _: None))
    assert {name for name, status in redo.items() if status == "ran"} == {"transfer", "plus", "teacher-check",
                                                                          "evaluate", "onnx", "validate"}
    assert redo["extract"] == redo["cache-source-train"] == redo["head-target"] == "skipped"


def test_force_redoes_a_step_whose_inputs_are_unchanged(copied_run):
    recipe, out = copied_run
    forced = run_export(recipe, out, force=True, progress=False, log=lambda _: None)
    assert statuses(forced)["extract"] == "ran"


def test_a_second_concurrent_export_to_the_same_directory_is_refused(tmp_path):
    recipe = small_recipe(tmp_path)
    with exclusive(tmp_path / "out"):
        with pytest.raises(InputError, match="another transmiter export is writing to"):
            run_export(recipe, tmp_path / "out", progress=False, log=lambda _: None)


def test_cli_validates_recipes_and_reports_bad_ones_in_one_line(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(SMALL_DEMO)
    assert main(["export", str(good), "--check"]) == 0
    assert "is valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL_DEMO.replace("extraction: {epochs: 3}", "extraction: {epoch: 3}"))
    assert main(["export", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "extraction.epoch: unknown key (did you mean 'epochs'?)" in err
    assert not (Path("export") / "out" / "small-demo").exists()


@pytest.mark.slow
def test_a_failed_step_leaves_the_completed_ones_usable(tmp_path):
    # 1,000 classes need more auxiliary names than the demo world has phrases: the head step fails
    too_wide = small_recipe(tmp_path, SMALL_DEMO.replace("head: {logit_width: 64}", "head: {logit_width: 1000}"))
    with pytest.raises(InputError, match="auxiliary"):
        run_export(too_wide, tmp_path / "out", progress=False, log=lambda _: None)
    assert not (tmp_path / "out" / "heads").exists() and not (tmp_path / "out" / "report.md").exists()
    fixed = run_export(small_recipe(tmp_path), tmp_path / "out", progress=False, log=lambda _: None)
    done = statuses(fixed)
    assert done["data"] == done["cache-source-train"] == done["cache-target-test"] == "skipped"
    assert done["head-source"] == done["onnx"] == "ran"
