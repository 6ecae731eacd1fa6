"""`transmiter upgrade EXPORT --target NAME --out NEW`: every task of an export moved onto a new
target in closed form, and judged against the old one image by image (docs/upgrade.md).

1. The old export's recorded recipe (pipeline/recipe_record.py) with the new target, checked as a
   recipe's target is; ``NEW`` may be neither the old export nor inside it (the old one must stay
   intact: it is what a server rolls back to).
2. ``NEW/lineage.json``: the old export's manifest sha256, directory, target and the next
   generation, which the new deployable manifest records (deploy/export_format.py).
3. The source side reused (upgrade/plan.py), then the export run as ``transmiter export`` runs it:
   only the target's steps run, and the step records say which were reused.
4. Per task, old against new on the test images (upgrade/judge.py), a verdict by the rules, the
   bank's verdict, cost; ``upgrade.json`` and ``upgrade.md`` in ``NEW``.

Interrupted anywhere, the old export is untouched (it is only read) and a re-run of the same
command continues where the last one stopped (every step writes atomically).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..artifacts import MANIFESTS, atomic_write_text, read_json, sha256_file, utc_now, write_json
from ..deploy.export_format import UPGRADE_REPORT, UPGRADE_REPORT_FORMAT, Lineage, generation_of
from ..errors import InputError, VerificationError
from ..method.comparison import VerdictRules
from ..pipeline.export_run import LINEAGE_FILE
from ..pipeline.recipe import ModelRef, with_target
from ..pipeline.recipe_record import read_recipe_record, recipe_record
from .judge import cost, judge_task
from .settings import LatencySettings
from .plan import STEPS_DIR, UpgradePlan, plan_steps, reuse, task_root

REPORT_JSON, REPORT_FORMAT, REPORT_MD = UPGRADE_REPORT, UPGRADE_REPORT_FORMAT, "upgrade.md"


class UpgradeHeld(VerificationError):
    """A task is worse (or its verdict below ``--require``) and was not accepted by name: the new
    export is written and judged, and must not replace the old one."""


@dataclass
class UpgradeReport:
    old: Path
    new: Path
    generation: int
    tasks: list[dict[str, Any]]
    verdict: str  # "go" | "held"
    held: list[str]
    rules: VerdictRules
    accepted: list[str]
    cost: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"upgrade {self.old} -> {self.new} (generation {self.generation}): {self.verdict}"
                 + (f" (held by {', '.join(self.held)})" if self.held else "")]
        for task in self.tasks:
            accepted = " (accepted)" if task["task"] in self.accepted else ""
            lines.append(f"  {task['task']}: {task['verdict']}{accepted}: {task['why']}")
        return lines


def target_ref(name: str, pretrained: str | None = None, checkpoint: Path | None = None, init_seed: int | None = None,
               demo_weights: str | None = None) -> ModelRef:
    """The new target as a recipe names it; a shipped demo model's name alone means its weights."""
    from ..demo.weights import shipped_weights_dir

    given = (pretrained, checkpoint, init_seed, demo_weights)
    if all(value is None for value in given) and (shipped_weights_dir() / f"{name}.safetensors").is_file():
        demo_weights = name
    return ModelRef(name, pretrained=pretrained, checkpoint=Path(checkpoint).absolute() if checkpoint else None,
                    demo_weights=demo_weights, init_seed=init_seed)


def _export_manifest(directory: Path) -> Path:
    return directory / "onnx" / MANIFESTS["export"]


def plan_upgrade(old: Path, target: ModelRef, new: Path) -> UpgradePlan:
    """What the upgrade will reuse and run, every input checked, nothing written."""
    old, new = Path(old).resolve(), Path(new).resolve()
    if not old.is_dir():
        raise InputError(f"export directory not found: {old}")
    if new == old or new.is_relative_to(old):
        raise InputError(f"--out {new} is {'the old export' if new == old else 'inside the old export'}: the old "
                         "export must stay intact (it is what a server rolls back to); choose another directory")
    if old.is_relative_to(new):
        raise InputError(f"--out {new} holds the old export {old}: choose a directory beside it")
    if not _export_manifest(old).is_file():
        raise InputError(f"{old} has no export ({_export_manifest(old).relative_to(old)} is missing): "
                         "give the --out directory of a finished `transmiter export`")
    recipe = read_recipe_record(old)
    if target == recipe.target:
        raise InputError(f"{old} already targets {target.name} with these weights: nothing to upgrade")
    upgraded = with_target(recipe, target, "--target")
    _check_new_directory(old, new)
    return UpgradePlan(old, new, upgraded, recipe.target, plan_steps(old, recipe))


def _check_new_directory(old: Path, new: Path) -> None:
    """``new`` is empty, missing, or an interrupted upgrade of the same export (which continues)."""
    if not new.exists():
        return
    if not new.is_dir():
        raise InputError(f"--out {new} exists and is not a directory")
    if not any(new.iterdir()):
        return
    lineage = new / LINEAGE_FILE
    if lineage.is_file():
        parent = read_json(lineage, "lineage").get("parent_directory")
        if parent == str(old):
            return
        raise InputError(f"--out {new} is an upgrade of another export ({parent}); choose another directory")
    raise InputError(f"--out {new} is not empty and is not an upgrade of {old}; choose an empty or new directory")


def _lineage(plan: UpgradePlan) -> Lineage:
    manifest = read_json(_export_manifest(plan.old), "export manifest")
    return Lineage(generation_of(manifest, str(_export_manifest(plan.old))) + 1, sha256_file(_export_manifest(plan.old)),
                   str(plan.old), recipe_record(dataclasses.replace(plan.recipe, target=plan.old_target))["target"])


def upgrade_export(old: Path, target: ModelRef, new: Path, rules: VerdictRules = VerdictRules(),
                   accept: tuple[str, ...] = (), latency: LatencySettings = LatencySettings(), progress: bool = True,
                   log: Callable[[str], None] = print) -> UpgradeReport:
    """Run the upgrade (module doc); returns the report, raises :class:`UpgradeHeld` after
    writing it when a task holds the upgrade."""
    from ..pipeline.bank_export import run_bank_export
    from ..pipeline.export import run_export

    plan = plan_upgrade(old, target, new)
    recipe = plan.recipe
    unknown = [name for name in accept if name not in [task.name for task in recipe.tasks]]
    if unknown:
        raise InputError(f"--accept {unknown[0]}: no such task (tasks: {', '.join(t.name for t in recipe.tasks)})")
    lineage = _lineage(plan)
    plan.new.mkdir(parents=True, exist_ok=True)
    write_json(plan.new / LINEAGE_FILE, lineage.to_dict())
    reuse(plan, log)
    outcome = (run_bank_export if recipe.bank else run_export)(recipe, plan.new, progress=progress, log=log)
    tasks = []
    for index, task in enumerate(recipe.tasks, 1):
        log(f"[judge] {task.name} ({index}/{len(recipe.tasks)}): old against new on its test images")
        root = task_root(recipe, task.name)
        tasks.append(judge_task(plan.old / root, plan.new / root, task, rules))
    held = [t["task"] for t in tasks if not rules.met(t["verdict"]) and t["task"] not in accept]
    report = UpgradeReport(plan.old, plan.new, lineage.generation, tasks, "held" if held else "go", held, rules,
                           list(accept), cost(plan.old / "onnx", plan.new / "onnx", latency),
                           [{"name": s.name, "status": s.status, "seconds": s.seconds, "detail": s.detail}
                            for s in outcome.steps])
    write_report(report)
    if held:
        for line in report.summary():
            log(line)
        raise UpgradeHeld(f"upgrade held: {', '.join(f'{name} ({_verdict_of(tasks, name)})' for name in held)} "
                          f"below --require {rules.require}; the new export is in {plan.new} for inspection "
                          f"({REPORT_MD}); --accept TASK to go ahead")
    return report


def _verdict_of(tasks: list[dict[str, Any]], name: str) -> str:
    return next(t["verdict"] for t in tasks if t["task"] == name)


def write_report(report: UpgradeReport) -> None:
    record = {"format": REPORT_FORMAT, "format_version": 1, "created": utc_now(), "old": str(report.old),
              "new": str(report.new), "generation": report.generation, "verdict": report.verdict,
              "held": report.held, "accepted": report.accepted, "rules": report.rules.to_dict(),
              "tasks": report.tasks, "cost": report.cost, "steps": report.steps}
    write_json(report.new / REPORT_JSON, record)
    atomic_write_text(report.new / REPORT_MD, report_markdown(record))


def _interval(entry: dict[str, Any] | None, scale: float = 100.0, signed: bool = False) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    form = "+.1f" if signed else ".1f"
    return f"{scale * entry['value']:{form}} [{scale * entry['low']:{form}}, {scale * entry['high']:{form}}]"


def report_markdown(record: dict[str, Any]) -> str:
    """upgrade.md: per task the accuracies with intervals, the paired difference, flips, verdict;
    then cost and the steps (which were reused)."""
    rules = record["rules"]
    lines = [f"# Upgrade report: generation {record['generation']}", "",
             f"Old export: `{record['old']}`. New export: `{record['new']}`.", "",
             f"**Verdict: {record['verdict']}**" + (f" (held by {', '.join(record['held'])})" if record["held"] else ""),
             "", f"Rules: not worse = the accuracy difference's 95% interval above -{100 * rules['margin']:g} points; "
                 f"negative flips at most {100 * rules['max_negative_flips']:g}% of the images; every task must be "
                 f"`{rules['require']}`" + (f"; accepted by name: {', '.join(record['accepted'])}" if record["accepted"]
                                           else "") + ".", "",
             "Accuracy (%) with Wilson 95% intervals (HM: bootstrap); difference = new - old, with Newcombe's paired "
             "interval and McNemar's exact p; flips: share of the images (negative: right before, wrong after).", "",
             "| task | images | old base | new base | old novel | new novel | old HM | new HM | difference | McNemar p "
             "| agreement | negative flips | positive flips | verdict |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- |"]
    notes = []
    for task in record["tasks"]:
        if not task.get("labelled"):
            shift = task.get("prediction_shift")
            lines.append(f"| {task['task']} | {task['images']} | | | | | | | | | {_interval(task.get('agreement'))} "
                         f"| | | {task['verdict']} |")
            notes.append(f"- {task['task']}: {task['why']}" + (f"; predicted-class shift (total variation) "
                                                               f"{shift:.3f}" if shift is not None else ""))
            continue
        old, new, difference = task["before"], task["after"], task["difference"]
        lines.append(f"| {task['task']} | {task['images']} | {_interval(old['base'])} | {_interval(new['base'])} "
                     f"| {_interval(old['novel'])} | {_interval(new['novel'])} | {_interval(old['hm'])} "
                     f"| {_interval(new['hm'])} | {_interval(difference, signed=True)} | {difference['mcnemar_p']:.3g} "
                     f"| {_interval(task['agreement'])} | {_interval(task['negative_flips'])} "
                     f"| {_interval(task['positive_flips'])} | {task['verdict']} |")
        notes.append(f"- {task['task']}: {task['why']}")
    lines += ["", *notes, "", "## Cost", ""]
    cost_record = record["cost"]
    lines += ["| | old | new |", "| --- | ---: | ---: |",
              f"| target | {cost_record['old']['target']} | {cost_record['new']['target']} |",
              f"| image size | {cost_record['old']['image_size']} | {cost_record['new']['image_size']} |",
              f"| MACs per image | {cost_record['old']['macs_per_image']:,} | {cost_record['new']['macs_per_image']:,} |"]
    for precision in cost_record["new"]["graph_bytes"]:
        lines.append(f"| {precision} graph bytes | {cost_record['old']['graph_bytes'].get(precision, 0):,} "
                     f"| {cost_record['new']['graph_bytes'][precision]:,} |")
    latency = cost_record.get("latency", {})
    if latency.get("rows"):
        lines += ["", f"Latency ({latency['runtime']}, fp32, {latency['kind']}): p50 ms.", "",
                  "| batch | old p50 | new p50 | new / old (p50) | new / old (median of paired rounds) | rounds |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['batch']} | {row['old']['p50_ms']:.2f} | {row['new']['p50_ms']:.2f} "
                  f"| {row['new_over_old_p50']:.3f} | {row['new_over_old_paired_median']:.3f} | {row['new']['rounds']} |"
                  for row in latency["rows"]]
    reused = [s for s in record["steps"] if s["status"] == "reused"]
    ran = [s for s in record["steps"] if s["status"] == "ran"]
    lines += ["", "## Steps", "", f"{len(reused)} reused from the old export (sha256 verified), {len(ran)} ran, "
              f"{sum(s['seconds'] for s in ran):.1f} s in all.", "", "| step | status | seconds | detail |",
              "| --- | --- | ---: | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['detail']} |" for s in record["steps"]]
    return "\n".join(lines) + "\n"


def dry_run_lines(plan: UpgradePlan) -> list[str]:
    """What ``--dry-run`` prints: every recorded step, reused or run, and why."""
    reused = len(plan.reused)
    return [f"upgrade {plan.old} -> {plan.new}: target {plan.recipe.target.name} "
            f"({len(plan.recipe.tasks)} task(s)); {reused} step(s) reused, {len(plan.steps) - reused} run "
            f"(as the old export recorded them in {STEPS_DIR}/; nothing written)", *plan.lines()]
