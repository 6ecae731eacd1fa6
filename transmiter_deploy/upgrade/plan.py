"""What an upgrade reuses and what it runs again, and the reuse itself (docs/upgrade.md).

An export's steps (pipeline/steps.py) are keyed by what they read. The source side of every task
(its rendered demo data, the source's and the teacher's caches and heads, the extracted adapter)
reads nothing of the target, so its keys are the same under a new target: its outputs and step
records are copied from the old export (hard links where the file system allows; artifacts are
never modified in place), each file checked against the sha256 the old export's manifests record,
and the new export's steps then find them done (status ``reused``). Everything else depends on
the target and runs: its caches and head, the closed-form transfer, TransMiter+, the teacher check,
the accuracy table, ONNX with every precision and gate, engines and validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..artifacts import MANIFESTS, read_json, sha256_file, write_json
from ..errors import IntegrityError
from ..pipeline.bank_export import TASKS_DIR
from ..pipeline.recipe import ModelRef, Recipe
from ..pipeline.steps import REUSED_FROM
from ..runtimes.onnx_files import link_or_copy

STEPS_DIR = ".steps"
# a source-side step (after a bank task's "<task>." prefix) -> where its outputs are, under the task's root
SOURCE_SIDE = (
    (re.compile(r"data"), lambda m: ["data"]),
    (re.compile(r"cache-source-(\w+)"), lambda m: [f"caches/source-{m[1]}"]),
    (re.compile(r"cache-teacher-(\w+)"), lambda m: [f"caches/teacher-{m[1]}", f"caches/teacher-logits-{m[1]}"]),
    (re.compile(r"head-(source|teacher)"), lambda m: [f"heads/{m[1]}"]),
    (re.compile(r"extract"), lambda m: ["adapters/extracted"]),
)
WHY_REUSED = "source side: reads nothing of the target"
WHY_RUN = "depends on the target"


@dataclass(frozen=True)
class PlannedStep:
    name: str
    action: str  # "reuse" | "run"
    why: str
    outputs: tuple[str, ...] = ()  # a reused step's artifact directories, relative to the export


@dataclass
class UpgradePlan:
    old: Path
    new: Path
    recipe: Recipe  # the old export's recipe with the new target
    old_target: ModelRef  # what it replaced (the lineage records it)
    steps: list[PlannedStep] = field(default_factory=list)

    @property
    def reused(self) -> list[PlannedStep]:
        return [step for step in self.steps if step.action == "reuse"]

    def lines(self) -> list[str]:
        width = max((len(step.name) for step in self.steps), default=4)
        return [f"  {step.action:5}  {step.name:{width}}  {step.why}" for step in self.steps]


def task_root(recipe: Recipe, name: str) -> str:
    """Where a task's per-task outputs are, relative to the export ("" for a single task)."""
    return f"{TASKS_DIR}/{name}/" if recipe.bank else ""


def _split_prefix(recipe: Recipe, step: str) -> tuple[str, str]:
    """(task root, step name without its task prefix) of a step record's name."""
    if recipe.bank:
        for task in recipe.tasks:
            if step.startswith(f"{task.name}."):
                return task_root(recipe, task.name), step[len(task.name) + 1:]
        return "", step
    return "", step


def plan_steps(old: Path, recipe: Recipe) -> list[PlannedStep]:
    """Every step the old export recorded, as reused or run again; a source-side step whose
    outputs are not all in the old export runs."""
    # in the order the old export ran them (each record is written when its step ends)
    records = sorted((old / STEPS_DIR).glob("*.json"), key=lambda path: (path.stat().st_mtime_ns, path.name))
    planned = []
    for record in records:
        name = record.stem
        root, bare = _split_prefix(recipe, name)
        match = next(((m, where) for pattern, where in SOURCE_SIDE if (m := pattern.fullmatch(bare))), None)
        if match is None or (recipe.bank and not root):
            planned.append(PlannedStep(name, "run", WHY_RUN))
            continue
        present = [f"{root}{path}" for path in match[1](match[0]) if (old / root / path).is_dir()]
        if not present:
            planned.append(PlannedStep(name, "run", f"{WHY_REUSED}, but its outputs are not in {old}"))
            continue
        planned.append(PlannedStep(name, "reuse", WHY_REUSED, tuple(present)))
    return planned


def _recorded_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """File name -> sha256 as an artifact's manifest records them (``files`` entries, cache shards)."""
    found = {}
    files = manifest.get("files")
    if isinstance(files, dict):
        found.update({name: entry["sha256"] for name, entry in files.items()
                      if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)})
    for shard in manifest.get("shards") or []:
        if isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("sha256"), str):
            found[shard["file"]] = shard["sha256"]
    return found


def _marker_of(directory: Path) -> Path | None:
    return next((directory / name for name in MANIFESTS.values() if (directory / name).is_file()), None)


def verify_copy(original: Path, copy: Path) -> None:
    """``copy`` holds what ``original`` holds: every file its manifest records has that sha256
    (the old export's record, not a recomputation), and the rest (the manifest itself, a demo
    split's images) are byte-identical to the original's. IntegrityError naming the first that differs."""
    marker = _marker_of(original)
    recorded = _recorded_hashes(read_json(marker, "artifact manifest")) if marker is not None else {}
    originals = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    copies = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    if originals != copies:
        missing = sorted(set(map(str, originals)) ^ set(map(str, copies)))
        raise IntegrityError(f"reusing {original}: the copy differs in its files ({missing[0]})")
    for relative in originals:
        expected = recorded.get(str(relative)) or sha256_file(original / relative)
        if sha256_file(copy / relative) != expected:
            raise IntegrityError(f"reusing {original / relative}: it does not match the sha256 its manifest records "
                                 "(modified since the export?)")


def reuse(plan: UpgradePlan, log: Callable[[str], None]) -> None:
    """The plan's reused steps' outputs and records copied into the new export, verified; a step
    already reused by an interrupted run of the same upgrade is verified again and kept."""
    from ..artifacts import atomic_directory

    (plan.new / STEPS_DIR).mkdir(parents=True, exist_ok=True)
    for step in plan.reused:
        for relative in step.outputs:
            source, target = plan.old / relative, plan.new / relative
            marker = _marker_of(source)
            marker_name = marker.name if marker is not None else (
                "data.json" if (source / "data.json").is_file() else next(iter(sorted(p.name for p in source.iterdir()))))
            if not target.is_dir():
                with atomic_directory(target, marker_name) as staging:
                    for path in sorted(source.rglob("*")):
                        where = staging / path.relative_to(source)
                        if path.is_dir():
                            where.mkdir(parents=True, exist_ok=True)
                        else:
                            where.parent.mkdir(parents=True, exist_ok=True)
                            link_or_copy(path, where)
            verify_copy(source, target)
        record = read_json(plan.old / STEPS_DIR / f"{step.name}.json", "step record")
        write_json(plan.new / STEPS_DIR / f"{step.name}.json", {**record, REUSED_FROM: str(plan.old)})
        log(f"[reuse] {step.name}: {', '.join(step.outputs)} (sha256 verified)")
