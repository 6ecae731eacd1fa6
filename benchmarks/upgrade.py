"""The demo upgrade and what it costs: the demo bank on TM-Demo-Target upgraded onto TM-Demo-Large.

    python benchmarks/upgrade.py --work build/upgrade-bench \\
        --json benchmarks/results/upgrade/demo_bank.json --markdown benchmarks/results/upgrade/demo_bank.md

1. ``export/recipes/demo-bank.yaml`` exported into ``WORK/old`` (skipped when already there);
2. ``transmiter upgrade WORK/old --target TM-Demo-Large --out WORK/upgraded`` (every task accepted:
   the table reports the verdicts, it does not act on them), timed;
3. a fresh export of ``export/recipes/demo-bank-large.yaml`` (the same recipe with the new target)
   into ``WORK/fresh``, timed, on the same machine right after.

The target: the upgrade's time is its target-side steps' alone, at most 1.1x the same
steps of the fresh export (step by step from both exports' step records); the ratio to the whole
fresh export is reported too. Both exports run one after the other in this process, so a slow
minute can fall on either: re-run and compare the two ratios when they disagree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from transmiter_deploy.artifacts import library_versions, utc_now
from transmiter_deploy.host import cpu_model
from transmiter_deploy.pipeline.bank_export import run_bank_export
from transmiter_deploy.pipeline.recipe import ModelRef, load_recipe
from transmiter_deploy.pipeline.recipe_record import recipe_record
from transmiter_deploy.upgrade.run import UpgradeHeld, report_markdown, upgrade_export

ROOT = Path(__file__).resolve().parent.parent
OLD_RECIPE = ROOT / "export" / "recipes" / "demo-bank.yaml"
NEW_RECIPE = ROOT / "export" / "recipes" / "demo-bank-large.yaml"
TARGET = ModelRef("TM-Demo-Large", demo_weights="TM-Demo-Large")


def timed(work) -> tuple[object, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "upgrade-bench")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    args = parser.parse_args()
    quiet = lambda line: None  # noqa: E731
    old_recipe, new_recipe = load_recipe(OLD_RECIPE), load_recipe(NEW_RECIPE)
    expected = {**recipe_record(old_recipe), "name": new_recipe.name, "target": recipe_record(new_recipe)["target"]}
    if recipe_record(new_recipe) != expected:
        raise SystemExit(f"{NEW_RECIPE} must be {OLD_RECIPE} with another name and target")
    old, upgraded, fresh = args.work / "old", args.work / "upgraded", args.work / "fresh"
    _, old_seconds = timed(lambda: run_bank_export(old_recipe, old, progress=False, log=quiet))
    for directory in (upgraded, fresh):
        shutil.rmtree(directory, ignore_errors=True)
    tasks = tuple(task.name for task in old_recipe.tasks)
    try:
        report, upgrade_seconds = timed(lambda: upgrade_export(old, TARGET, upgraded, accept=tasks, progress=False,
                                                               log=quiet))
    except UpgradeHeld as exc:  # every task is accepted: a hold here is a bug
        raise SystemExit(str(exc)) from exc
    outcome, fresh_seconds = timed(lambda: run_bank_export(new_recipe, fresh, progress=False, log=quiet))
    fresh_steps = {step.name: step.seconds for step in outcome.steps if step.status == "ran"}
    ran = {step["name"]: step["seconds"] for step in report.steps if step["status"] == "ran"}
    reused = [step["name"] for step in report.steps if step["status"] == "reused"]
    missing = sorted(set(ran) - set(fresh_steps))
    if missing:
        raise SystemExit(f"steps the upgrade ran that the fresh export did not: {missing}")
    target_side_fresh = sum(fresh_steps[name] for name in ran)
    record = {
        "created": utc_now(), "machine": cpu_model(), "versions": library_versions(),
        "command": "python benchmarks/upgrade.py --work build/upgrade-bench --json benchmarks/results/upgrade/"
                   "demo_bank.json --markdown benchmarks/results/upgrade/demo_bank.md",
        "old_export_s": old_seconds, "upgrade_s": upgrade_seconds, "fresh_export_s": fresh_seconds,
        "upgrade_steps_s": sum(ran.values()), "same_steps_in_fresh_s": target_side_fresh,
        "steps_ratio": sum(ran.values()) / target_side_fresh, "whole_ratio": upgrade_seconds / fresh_seconds,
        "reused_steps": reused, "ran_steps": ran, "fresh_steps": fresh_steps,
        "report": json.loads((upgraded / "upgrade.json").read_text()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    args.markdown.write_text(markdown(record))
    print(f"upgrade {upgrade_seconds:.1f} s (its steps {record['upgrade_steps_s']:.1f} s) against the same steps "
          f"{target_side_fresh:.1f} s of a fresh export ({record['steps_ratio']:.3f}x) and the whole fresh export "
          f"{fresh_seconds:.1f} s ({record['whole_ratio']:.3f}x); {len(reused)} steps reused")
    return 0


def markdown(record: dict) -> str:
    lines = ["# The demo upgrade: demo bank, TM-Demo-Target -> TM-Demo-Large", "",
             f"Made by `{record['command']}` on {record['machine']}, {record['created']}.", "",
             "| | seconds |", "| --- | ---: |",
             f"| the upgrade, end to end (`upgrade_export`: reuse, export, judging, latency) | {record['upgrade_s']:.1f} |",
             f"| its steps that ran ({len(record['ran_steps'])}) | {record['upgrade_steps_s']:.1f} |",
             f"| the same steps in a fresh export of `export/recipes/demo-bank-large.yaml` | "
             f"{record['same_steps_in_fresh_s']:.1f} |",
             f"| the whole fresh export | {record['fresh_export_s']:.1f} |", "",
             f"Upgrade steps / the same steps fresh: **{record['steps_ratio']:.3f}** (target: at most 1.1). "
             f"Whole upgrade / whole fresh export: **{record['whole_ratio']:.3f}**. "
             f"{len(record['reused_steps'])} steps reused, not run: {', '.join(record['reused_steps'])}.", "",
             "The upgrade report (`upgrade.md` of the new export):", ""]
    report = report_markdown(record["report"]).splitlines()
    body = report[:report.index("## Steps")] if "## Steps" in report else report  # its steps: in the JSON
    lines += [line.replace("# Upgrade report", "## Upgrade report").replace("## Cost", "### Cost") for line in body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
