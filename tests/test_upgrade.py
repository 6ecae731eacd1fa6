"""`transmiter upgrade` (transmiter_deploy/upgrade/): a small export and a small bank moved onto
another target. The source side is reused (the step records say so, the artifacts are byte for
byte the old export's), only the target's steps run, the new manifest records its lineage, the
report's figures agree with each export's own accuracy table, and every bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import BANK_TASKS, BANK_UPGRADE_TARGET, copy_tree, tree_digest
from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.cli import main
from transmiter_deploy.errors import InputError
from transmiter_deploy.pipeline.recipe import ModelRef, load_recipe
from transmiter_deploy.pipeline.steps import tree_sha256
from transmiter_deploy.upgrade.run import UpgradeHeld, upgrade_export
from transmiter_deploy.upgrade.settings import LatencySettings

# another architecture with another image size (32 px against the demo target's 48): random weights
TARGET = ModelRef("TM-Tiny-ViT", init_seed=0)
QUICK = LatencySettings(batches=(1,), budget_s=0.5, min_rounds=3)
SOURCE_SIDE = {"data", "cache-source-train", "cache-source-test", "cache-teacher-train", "cache-teacher-fewshot",
               "cache-teacher-test", "head-source", "head-teacher", "extract"}
TARGET_SIDE = {"cache-target-train", "cache-target-fewshot", "cache-target-test", "head-target", "transfer", "plus",
               "teacher-check", "evaluate", "onnx", "validate"}
REUSED_DIRS = ["data", "caches/source-train", "caches/source-test", "caches/teacher-train", "caches/teacher-test",
               "caches/teacher-fewshot", "heads/source", "heads/teacher", "adapters/extracted"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def upgraded(demo_export, tmp_path_factory) -> tuple[Path, Path, UpgradeHeld]:
    """(old, new, the hold): the demo export upgraded onto TARGET; a random-weight target is worse,
    so the upgrade is held, its new export and report written."""
    old = demo_export[1].out_dir
    new = tmp_path_factory.mktemp("upgrade") / "new"
    with pytest.raises(UpgradeHeld) as held:
        upgrade_export(old, TARGET, new, latency=QUICK, progress=False, log=lambda _: None)
    return old, new, held.value


def steps_of(new: Path) -> dict[str, str]:
    return {step["name"]: step["status"] for step in json.loads((new / "upgrade.json").read_text())["steps"]}


def test_the_source_side_is_reused_byte_for_byte_and_only_the_target_side_runs(upgraded):
    old, new, _ = upgraded
    steps = steps_of(new)
    assert {name for name, status in steps.items() if status == "reused"} == SOURCE_SIDE
    assert TARGET_SIDE <= {name for name, status in steps.items() if status == "ran"}
    for relative in REUSED_DIRS:
        assert tree_sha256(new / relative) == tree_sha256(old / relative), relative
    for name in SOURCE_SIDE:  # the same keys: the export found the steps done, it did not redo them
        recorded = [json.loads((root / ".steps" / f"{name}.json").read_text()) for root in (old, new)]
        assert recorded[0]["key"] == recorded[1]["key"] and recorded[1]["reused_from"] == str(old.resolve())
    report = (new / "report.md").read_text()
    assert "| extract | reused | 0.0 | outputs reused from" in report


def test_the_new_export_records_its_recipe_target_and_lineage(upgraded):
    old, new, _ = upgraded
    recipe = load_recipe(new / "recipe.json")
    assert recipe.target == TARGET and recipe.source == load_recipe(old / "recipe.json").source
    manifest = json.loads((new / "onnx" / "manifest.json").read_text())
    assert manifest["lineage"] == {"generation": 2, "parent_manifest_sha256": sha256_file(old / "onnx" / "manifest.json"),
                                   "parent_directory": str(old.resolve()),
                                   "parent_target": {"name": "TM-Demo-Target", "demo_weights": "TM-Demo-Target"}}
    assert manifest["preprocess"]["image_size"] == [32, 32]  # the new target's preprocessing


def test_the_report_agrees_with_each_exports_accuracy_table(upgraded):
    old, new, held = upgraded
    record = json.loads((new / "upgrade.json").read_text())
    (task,) = record["tasks"]
    for side, root in (("before", old), ("after", new)):
        table = {row["model"]: row for row in json.loads((root / "accuracy.json").read_text())["rows"]}
        exported = table["target + TransMiter+"]
        for split in ("base", "novel"):
            assert 100 * task[side][split]["value"] == pytest.approx(exported[split], abs=1e-3)
    counts = task["difference"]["table"]
    assert sum(counts.values()) == task["images"] == 64
    assert task["negative_flips"]["count"] == counts["before_only"] and task["positive_flips"]["count"] == counts["after_only"]
    assert task["difference"]["value"] == pytest.approx((counts["after_only"] - counts["before_only"]) / 64)
    assert record["verdict"] == "held" and record["held"] == ["small-demo"] and task["verdict"] == "worse"
    assert "upgrade held: small-demo (worse)" in str(held)
    cost = record["cost"]
    assert cost["old"]["image_size"] == [48, 48] and cost["new"]["image_size"] == [32, 32]
    assert cost["new"]["macs_per_image"] < cost["old"]["macs_per_image"]
    assert set(cost["new"]["graph_bytes"]) == {"fp32", "fp16"}
    (row,) = cost["latency"]["rows"]
    assert row["batch"] == 1 and row["old"]["rounds"] == row["new"]["rounds"] >= 3
    text = (new / "upgrade.md").read_text()
    assert "**Verdict: held** (held by small-demo)" in text and "| small-demo | 64 |" in text


def test_a_rerun_continues_and_an_accepted_task_lets_the_upgrade_go_ahead(upgraded, tmp_path, capsys):
    """The same command again redoes nothing (every step skipped or reused); naming the worse task
    with --accept turns held into go, exit 0."""
    old, new, _ = upgraded
    again = copy_tree(new, tmp_path / "again")
    # the copy is an upgrade of the same export: it continues there
    code, out, err = run_cli(["upgrade", str(old), "--target", TARGET.name, "--init-seed", "0", "--out", str(again),
                              "--accept", "small-demo", "--latency-budget", "0"], capsys)
    assert code == 0, err
    assert "go" in out.splitlines()[0] and "small-demo: worse (accepted)" in out
    statuses = set(steps_of(again).values())
    assert "ran" not in statuses and statuses <= {"reused", "skipped", "unavailable"}


def test_the_dry_run_prints_the_plan_and_writes_nothing(demo_export, tmp_path, capsys):
    old = demo_export[1].out_dir
    code, out, err = run_cli(["upgrade", str(old), "--target", TARGET.name, "--init-seed", "0",
                              "--out", str(tmp_path / "new"), "--dry-run"], capsys)
    assert code == 0, err
    assert "9 step(s) reused" in out and "nothing written" in out
    lines = {line.split()[1]: line.split()[0] for line in out.splitlines()[1:]}
    assert {name for name, action in lines.items() if action == "reuse"} == SOURCE_SIDE
    assert lines["transfer"] == lines["onnx"] == "run"
    assert not (tmp_path / "new").exists()


def test_an_interrupted_upgrade_leaves_the_old_export_and_continues(demo_export, tmp_path, monkeypatch, capsys):
    """A library failing in the ONNX step (what no check anticipated): one line naming the step and
    exit 1, no traceback; the old export is as it was, the new one has what completed, and the next
    run continues from there (the target's caches are not computed again)."""
    import transmiter_deploy.deploy.onnx_export as onnx_export

    old = demo_export[1].out_dir
    before = tree_digest(old)
    new = tmp_path / "new"

    def broken(*args, **kwargs):
        raise RuntimeError("converter gave up")

    monkeypatch.setattr(onnx_export, "export_deployment", broken)
    code, _, err = run_cli(["upgrade", str(old), "--target", TARGET.name, "--init-seed", "0", "--out", str(new),
                            "--latency-budget", "0"], capsys)
    lines = err.strip().splitlines()  # the steps' log, then the one line
    assert code == 1 and lines[-1] == ("transmiter: internal error in step onnx of transmiter upgrade: RuntimeError: "
                                       "converter gave up (run with --debug for the traceback)")
    assert "Traceback" not in err
    monkeypatch.undo()
    assert tree_digest(old) == before
    assert (new / "caches" / "target-test" / "cache.json").is_file() and not (new / "onnx").exists()
    report = upgrade_export(old, TARGET, new, accept=("small-demo",), latency=QUICK, progress=False,
                            log=lambda _: None)
    statuses = {step["name"]: step["status"] for step in report.steps}
    assert statuses["cache-target-test"] == "skipped" and statuses["onnx"] == "ran"
    assert report.verdict == "go" and tree_digest(old) == before


def test_bad_inputs_are_one_line_and_write_nothing(demo_export, tmp_path, capsys):
    old = demo_export[1].out_dir
    before = tree_digest(old)
    no_record = copy_tree(old, tmp_path / "no-record")
    (no_record / "recipe.json").unlink()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    target = ["--target", TARGET.name, "--init-seed", "0"]
    cases = [
        ([str(no_record), *target, "--out", str(tmp_path / "a")], "has no recorded recipe (recipe.json)"),
        ([str(old), "--target", "TM-Demo-Targt", "--out", str(tmp_path / "b")],
         "--target: target.name: open_clip does not know model 'TM-Demo-Targt' (close: TM-Demo-Target"),
        ([str(old), *target, "--out", str(old)], "is the old export: the old export must stay intact"),
        ([str(old), *target, "--out", str(old / "inside")], "is inside the old export"),
        ([str(old), *target, "--out", str(tmp_path / "full")], "is not empty and is not an upgrade of"),
        ([str(old), "--target", "TM-Demo-Target", "--out", str(tmp_path / "c")], "already targets TM-Demo-Target"),
        ([str(old), *target, "--out", str(tmp_path / "d"), "--accept", "nosuch"], "--accept nosuch: no such task"),
        ([str(tmp_path / "nowhere"), *target, "--out", str(tmp_path / "e")], "export directory not found"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["upgrade", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert tree_digest(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "no-record"]


def test_a_held_upgrade_exits_4_and_names_the_task(upgraded, tmp_path, capsys):
    old, new, _ = upgraded
    again = copy_tree(new, tmp_path / "again")
    code, out, err = run_cli(["upgrade", str(old), "--target", TARGET.name, "--init-seed", "0", "--out", str(again),
                              "--latency-budget", "0"], capsys)
    assert code == 4 and "upgrade held: small-demo (worse) below --require not-worse" in err


# ------------------------------------------------------------------------------------- a bank


def test_a_bank_upgrade_reuses_every_tasks_source_side_and_judges_each_task(demo_bank_export, demo_bank_upgrade,
                                                                            tmp_path):
    old, new = demo_bank_export, demo_bank_upgrade
    record = json.loads((new / "upgrade.json").read_text())
    steps = {step["name"]: step["status"] for step in record["steps"]}
    for task in BANK_TASKS:
        assert {name.split(".", 1)[1] for name, status in steps.items()
                if status == "reused" and name.startswith(f"{task}.")} == SOURCE_SIDE
        for relative in REUSED_DIRS:
            assert tree_sha256(new / "tasks" / task / relative) == tree_sha256(old / "tasks" / task / relative)
    assert steps["backbone"] == steps["bank"] == "ran"
    assert [t["task"] for t in record["tasks"]] == list(BANK_TASKS)
    assert record["accepted"] == list(BANK_TASKS) and record["verdict"] == "go"
    manifest = json.loads((new / "onnx" / "manifest.json").read_text())
    assert manifest["lineage"]["generation"] == 2
    assert manifest["lineage"]["parent_manifest_sha256"] == sha256_file(old / "onnx" / "manifest.json")
    assert load_recipe(new / "recipe.json").target == ModelRef(**BANK_UPGRADE_TARGET)
    from transmiter_deploy.deploy.bank import remove_task  # editing the bank keeps where it came from

    edited = copy_tree(new, tmp_path / "edited")
    remove_task(edited / "onnx", BANK_TASKS[1], log=lambda _: None)
    assert json.loads((edited / "onnx" / "manifest.json").read_text())["lineage"] == manifest["lineage"]


def test_one_worse_task_holds_the_bank_unless_it_is_accepted(demo_bank_export, demo_bank_upgrade, tmp_path):
    old = demo_bank_export
    again = copy_tree(demo_bank_upgrade, tmp_path / "again")
    target = ModelRef(**BANK_UPGRADE_TARGET)
    verdicts = {t["task"]: t["verdict"] for t in json.loads((again / "upgrade.json").read_text())["tasks"]}
    worse = [task for task, verdict in verdicts.items() if verdict == "worse"]
    assert worse, verdicts  # random weights against the trained demo target
    with pytest.raises(UpgradeHeld, match=f"upgrade held: {worse[0]} \\(worse\\)"):
        upgrade_export(old, target, again, latency=LatencySettings(batches=()), progress=False, log=lambda _: None)
    others = tuple(task for task in BANK_TASKS if task != worse[0])
    with pytest.raises(UpgradeHeld) as held:
        upgrade_export(old, target, again, accept=others, latency=LatencySettings(batches=()), progress=False,
                       log=lambda _: None)
    assert worse[0] in str(held.value) and all(f"{task} (" not in str(held.value) for task in others)
    # a server is not switched to an upgrade its own report holds
    from transmiter_deploy.serving.triton import write_repository

    repository = tmp_path / "repo"
    write_repository(old, repository, layout="ensemble")
    before = tree_digest(repository)
    with pytest.raises(InputError, match=f"is an upgrade its report holds .*held by {worse[0]}"):
        write_repository(again, repository, layout="ensemble", update=True)
    assert tree_digest(repository) == before


@pytest.mark.parametrize("moment", ["[run ] onnx"])
def test_an_upgrade_killed_at_any_moment_leaves_the_old_export_and_the_next_run_completes(demo_export, tmp_path,
                                                                                         moment):
    """SIGKILL (no handler runs) while a target step writes: the old export is byte for byte as it
    was, nothing half-written is taken for done, and the same command completes the upgrade."""
    from cli_process import CliProcess

    old = demo_export[1].out_dir
    before = tree_digest(old)
    new = tmp_path / "new"
    args = ["upgrade", old, "--target", TARGET.name, "--init-seed", "0", "--out", new, "--accept", "small-demo",
            "--latency-budget", "0"]
    child = CliProcess(args)
    assert child.wait_for_stderr(moment, timeout=300), child.result(timeout=60).stderr
    child.kill()
    child.result(timeout=60)
    assert tree_digest(old) == before
    report = upgrade_export(old, TARGET, new, accept=("small-demo",), latency=LatencySettings(batches=()),
                            progress=False, log=lambda _: None)
    assert report.verdict == "go" and tree_digest(old) == before
    statuses = {step["name"]: step["status"] for step in report.steps}
    assert {name for name, status in statuses.items() if status == "reused"} == SOURCE_SIDE
    assert statuses["onnx"] == "ran" and (new / "onnx" / "manifest.json").is_file()
