"""What the demo world must show for the method to be exercised in its real regime.

The checks follow the paper's setting: the weak source is usable zero-shot,
fine-tuning it helps on base classes, the strong target beats it zero-shot,
the transferred adapter lifts the target on base classes without costing the
novel ones, and a few labels (TransMiter+) add more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import DemoTask

MIN_FINETUNE_GAIN = 15.0  # points, base classes
MIN_TRANSFER_GAIN = 5.0  # points, base classes, on at least MIN_TASKS_WITH_GAIN tasks
MAX_NOVEL_LOSS = 2.0  # points, on the tasks that count for the transfer gain
MIN_TASKS_WITH_GAIN = 2


@dataclass(frozen=True)
class Check:
    task: str
    name: str
    measured: str
    passed: bool


def _table(rows: list[dict], task: str) -> dict[str, dict]:
    return {row["model"]: row for row in rows if row["task"] == task}


def check_task(rows: list[dict], task: DemoTask) -> list[Check]:
    t = _table(rows, task.name)
    source, tuned, target = t["source zero-shot"], t["source fine-tuned"], t["target zero-shot"]
    moved, plus = t["target + TransMiter"], t["target + TransMiter+"]
    chance = 100.0 / len(task.classes)
    base_gain = moved["base"] - target["base"]
    novel_loss = target["novel"] - moved["novel"]
    return [
        # accuracy over all the task's classes, the task's own zero-shot accuracy
        Check(task.name, "source zero-shot >= 2x chance (all classes)",
              f"{source['all']:.1f} vs {2 * chance:.1f}", source["all"] >= 2 * chance),
        Check(task.name, f"fine-tuned source beats zero-shot source on base by >= {MIN_FINETUNE_GAIN:g}",
              f"{tuned['base'] - source['base']:+.1f}", tuned["base"] - source["base"] >= MIN_FINETUNE_GAIN),
        Check(task.name, "target zero-shot beats source zero-shot (HM)",
              f"{target['hm']:.1f} vs {source['hm']:.1f}", target["hm"] > source["hm"]),
        Check(task.name, f"target + TransMiter: base >= +{MIN_TRANSFER_GAIN:g}, novel >= -{MAX_NOVEL_LOSS:g}",
              f"base {base_gain:+.1f}, novel {-novel_loss:+.1f}",
              base_gain >= MIN_TRANSFER_GAIN and novel_loss <= MAX_NOVEL_LOSS),
        Check(task.name, "TransMiter+ beats TransMiter on base",
              f"{plus['base']:.1f} vs {moved['base']:.1f}", plus["base"] > moved["base"]),
    ]


def check_world(rows: list[dict], tasks: list[DemoTask]) -> tuple[list[Check], bool]:
    """Every check per task, and whether the world meets them all.

    The transfer-gain check must hold on at least ``MIN_TASKS_WITH_GAIN`` tasks;
    every other check must hold on every task.
    """
    checks = [check for task in tasks for check in check_task(rows, task)]
    gains = [c for c in checks if c.name.startswith("target + TransMiter:")]
    others = [c for c in checks if not c.name.startswith("target + TransMiter:")]
    met = all(c.passed for c in others) and sum(c.passed for c in gains) >= MIN_TASKS_WITH_GAIN
    return checks, met
