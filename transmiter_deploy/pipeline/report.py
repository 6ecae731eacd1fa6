"""``report.json`` and ``report.md`` of an export: accuracy, parity, MACs, validation, steps."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..artifacts import read_json, write_json
from .recipe import Recipe
from .steps import StepRecord

REPORT_FORMAT = "transmiter-deploy/export-report"


@dataclass
class ExportOutcome:
    out_dir: Path
    steps: list[StepRecord] = field(default_factory=list)
    accuracy: list[dict] = field(default_factory=list)
    task_accuracy: dict[str, list[dict]] = field(default_factory=dict)  # a bank: per task, in recipe order
    validation: list[dict] = field(default_factory=list)
    validation_skipped: list[str] = field(default_factory=list)
    export_dir: Path | None = None
    gates: list[dict] = field(default_factory=list)  # calibrated precisions: their accuracy gates
    teacher_check: dict | None = None  # will transfer help? (pipeline/teacher_check.py)
    task_teacher_check: dict[str, dict] = field(default_factory=dict)  # a bank: per task
    # head role (source, teacher, target; a bank's as "<task> <role>") -> the stand-in tokenizer its
    # text was encoded with, and why
    stand_in_tokenizers: dict[str, str] = field(default_factory=dict)

    def teacher_warnings(self) -> list[str]:
        """The teacher check's warnings, one per task that has one."""
        checks = {"": self.teacher_check} if self.teacher_check else {}
        checks.update({f"task {task}: ": check for task, check in self.task_teacher_check.items() if check})
        return [prefix + check["warning"] for prefix, check in checks.items() if check.get("warning")]


def write_report(recipe: Recipe, outcome: ExportOutcome) -> None:
    """report.json and report.md: accuracy, parity, MACs, and every step's status and time."""
    out = outcome.out_dir
    parity = read_json(outcome.export_dir / "parity.json", "parity report") if outcome.export_dir else None
    payload = {
        "format": REPORT_FORMAT, "format_version": 1, "recipe": str(recipe.path), "name": recipe.name,
        "steps": [asdict(step) for step in outcome.steps], "accuracy": outcome.accuracy,
        "task_accuracy": outcome.task_accuracy, "parity": parity,
        "validation": outcome.validation, "validation_skipped": outcome.validation_skipped,
        "gates": outcome.gates, "teacher_check": outcome.teacher_check,
        "task_teacher_check": outcome.task_teacher_check, "stand_in_tokenizers": outcome.stand_in_tokenizers,
    }
    write_json(out / "report.json", payload)
    lines = [f"# Export report: {recipe.name}", "", f"Recipe: `{recipe.path}`. Artifacts: `{outcome.export_dir}`.", ""]
    lines += [f"**Warning: {warning}**" for warning in outcome.teacher_warnings()]
    lines += [""] if outcome.teacher_warnings() else []
    lines += [f"Note: the {role} head's class names were tokenized by a {description} (random weights: shapes "
              "and speed only)." for role, description in outcome.stand_in_tokenizers.items()]
    lines += [""] if outcome.stand_in_tokenizers else []
    if outcome.teacher_check:
        lines += _teacher_check_lines("## Teacher check: will transfer help?", outcome.teacher_check)
    for task, check in outcome.task_teacher_check.items():
        lines += _teacher_check_lines(f"## Teacher check: task {task}", check) if check else []
    if outcome.accuracy:
        lines += _accuracy_lines("## Accuracy (test images)", outcome.accuracy)
    for task, rows in outcome.task_accuracy.items():
        lines += _accuracy_lines(f"## Accuracy: task {task} (test images)", rows)
    if parity and "tasks" in parity.get("macs", {}):
        lines += _bank_lines(parity)
    elif parity:
        lines += ["## Parity (ONNX Runtime CPU vs PyTorch)", "",
                  "| check | max abs | top-1 agreement | criterion | result |", "| --- | ---: | ---: | --- | --- |"]
        for name, c in parity["checks"].items():
            verdict = ("pass" if c["passed"] else "FAIL") + ("" if c["required"] else " (reported)")
            lines.append(f"| {name} | {c['max_abs']:.2e} | {c['top1_agreement']:.2%} | {c['criterion']} | {verdict} |")
        macs = parity["macs"]
        lines += ["", "## Cost (multiply-accumulates at batch 1)", "", "| component | MACs |", "| --- | ---: |",
                  f"| backbone | {macs['model'].get('backbone', 0):,} |",
                  f"| head + adapter (folded) | {macs['model'].get('head+adapter', 0):,} |",
                  f"| head + adapter, unfolded reference | {macs['head_unfolded']:,} |",
                  f"| overhead | {macs['overhead_percent']:.4f}% of the backbone |", ""]
    for gate in outcome.gates:
        lines += _gate_lines(gate)
    if outcome.validation:
        lines += ["## Runtimes against PyTorch (same images)", "",
                  "| runtime | graph | output | precision | max abs | top-1 agreement | result |",
                  "| --- | --- | --- | --- | ---: | ---: | --- |"]
        lines += [f"| {r['candidate']} | {r['graph']} | {r.get('output', '-')} | {r['precision']} | "
                  + (f"{r['max_abs']:.2e} | {r['top1_agreement']:.2%}" if "max_abs" in r else f"{r.get('error')} | -")
                  + f" | {'pass' if r['passed'] else 'FAIL'} |" for r in outcome.validation]
        lines += ["", *(f"Not run here: {reason}." for reason in outcome.validation_skipped), ""]
    lines += ["## Steps", "", "| step | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in outcome.steps]
    staging = out / ".report.md.tmp"
    staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(staging, out / "report.md")


def _accuracy_lines(title: str, rows: list[dict]) -> list[str]:
    cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return [title, "", "| model | base | novel | HM | all |", "| --- | ---: | ---: | ---: | ---: |",
            *(f"| {r['model']} | {cell(r['base'])} | {cell(r['novel'])} | {cell(r['hm'])} | {cell(r['all'])} |"
              for r in rows), "", *(f"{r['model']}: {r['note']}." for r in rows if r.get("note")),
            *([""] if any(r.get("note") for r in rows) else [])]


def _teacher_check_lines(title: str, check: dict) -> list[str]:
    """Teacher, target zero-shot and target + TransMiter on each labelled image set, and the verdict."""
    summary = check["summary"].rstrip(".")
    lines = [title, "", summary[0].upper() + summary[1:] + ".", ""]
    for entry in check["sets"]:
        if entry.get("note"):
            lines += [f"{entry['images']} images: {entry['note']}.", ""]
            continue
        lines += _accuracy_lines(f"Accuracy (%) on the {entry['samples']} {entry['images']} images:", entry["rows"])
    return lines


def _bank_lines(parity: dict) -> list[str]:
    """A bank's assembly checks and its cost: the backbone once, each task's head."""
    lines = ["## Bank assembly (the fused graph against its parts, ONNX Runtime CPU)", "",
             "| check | max abs | top-1 agreement | criterion | result |", "| --- | ---: | ---: | --- | --- |"]
    for name, c in parity["checks"].items():
        lines.append(f"| {name} | {c['max_abs']:.2e} | {c['top1_agreement']:.2%} | {c['criterion']} | "
                     f"{'pass' if c['passed'] else 'FAIL'} |")
    macs = parity["macs"]
    count = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    lines += ["", "## Cost (multiply-accumulates at batch 1)", "", "| component | MACs |", "| --- | ---: |",
              f"| backbone (once) | {count(macs.get('backbone'))} |",
              *(f"| head + adapter: {task} | {count(value)} |" for task, value in macs["tasks"].items()), ""]
    return lines


def _gate_lines(gate: dict) -> list[str]:
    """One calibrated precision's gate: its accuracy beside fp32's, each criterion, the verdict."""
    name = gate["precision"]
    task = f", task {gate['task']}" if gate.get("task") else ""  # a bank gates every task
    verdict = "pass" if gate["passed"] else f"FAIL: the {name} graphs were not added"
    if gate.get("advisory"):
        verdict += f" (criteria {'met' if gate['criteria_met'] else 'not met'}; {gate['advisory']})"
    lines = [f"## {name} accuracy gate{task} ({gate['images']}, {gate['samples']} images): {verdict}", ""]
    if gate["accuracy"]:
        cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines += ["| graph | base | novel | HM | all |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {graph} | {cell(r['base'])} | {cell(r['novel'])} | {cell(r['hm'])} | {cell(r['all'])} |"
                  for graph, r in gate["accuracy"].items()]
        lines.append("")
    lines += ["| criterion | value | result |", "| --- | ---: | --- |"]
    lines += [f"| {c['criterion']} | {c['value']:.4g} | {'pass' if c['passed'] else 'FAIL'} |" for c in gate["criteria"]]
    lines += ["", f"Max abs difference from the fp32 graph: {gate['max_abs']:.3g}; top-1 agreement with it: "
              f"{gate['top1_agreement']:.2%}.", ""]
    fallback = gate.get("fallback")
    if fallback:
        tried = ", ".join(f"{t['kept']} ({_verdict(t)}, agreement {t['top1_agreement']:.2%})"
                          for t in fallback["tries"]) or "none"
        lines += [f"The first {name} graph failed its gate; the most sensitive quantised nodes were kept in fp32 "
                  f"({fallback.get('reason') or fallback['criterion']}). Nodes kept in fp32 per try, of "
                  f"{fallback.get('quantised_nodes', '?')}: {tried}."]
        if fallback["passed"]:
            lines += ["", "Kept in fp32: " + ", ".join(f"`{node}`" for node in fallback["kept"]) + "."]
        lines.append("")
    return lines


def _verdict(attempt: dict) -> str:
    """A fallback try's verdict; a bank's try names the task whose gate failed (its agreement is
    the lowest of the tasks gated)."""
    if attempt["passed"]:
        return "pass"
    return f"fail at task {attempt['failed']}" if attempt.get("failed") else "fail"
