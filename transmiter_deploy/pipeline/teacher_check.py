"""The teacher check: will transfer help? (docs/method.md, "When transfer helps".)

The adapter moves the target towards what fine-tuning taught the weak model, so
it can only help where the fine-tuned teacher beats the target's zero-shot on
the task. On the labelled images an export has (the few-shot images, and the
test images where given) this step measures, over the task classes, the
teacher, the target zero-shot and the target + TransMiter (the transferred
adapter: TransMiter+ has seen the few-shot labels, so it is not judged on them).
The verdict compares teacher and target zero-shot image by image on the base
classes (of the few-shot images; of the test images when there are no few-shot
images): the 95% interval of teacher minus target (method/comparison.py, the
paired interval an upgrade is judged by) above 0 says transfer can help; at or
below 0 the check says plainly that transfer is unlikely to help and what to
try; an interval that holds 0 is "cannot tell with N images". It only reports: the artifacts are
exported as usual.
"""

from __future__ import annotations

from typing import Any

import torch

from ..artifacts import read_json, write_json
from ..method.comparison import correct_per_image, count_of_images, num_base_classes, paired_difference_interval
from ..method.evaluation import base_to_novel

CHECK_FILE = "teacher_check.json"
IMAGE_SETS = (("fewshot", "few-shot"), ("test", "test"))  # split, as the report names it; the first decides
ROWS = ("teacher (fine-tuned)", "target zero-shot", "target + TransMiter")


def teacher_check(image_sets: dict[str, dict[str, Any]], num_base: int | None) -> dict[str, Any]:
    """The check from logits: ``image_sets`` maps a set's name to its ``labels`` (N,), ``teacher``
    (N, K) or None with ``teacher_unavailable`` saying why, ``target`` (N, K) zero-shot and
    ``transmiter`` (N, K) task logits. Unlabelled images (label -1) are left out."""
    sets, verdict = [], None
    for name, given in image_sets.items():
        labelled = given["labels"] >= 0
        labels = given["labels"][labelled]
        entry: dict[str, Any] = {"images": name, "samples": int(labelled.sum()), "rows": []}
        if not len(labels):
            entry["note"] = "no labelled images"
            sets.append(entry)
            continue
        for row, key in zip(ROWS, ("teacher", "target", "transmiter")):
            logits = given[key]
            if logits is None:
                entry["rows"].append({"model": row, "base": None, "novel": None, "hm": None, "all": None,
                                      "note": f"not available: {given.get('teacher_unavailable')}"})
            else:
                entry["rows"].append({"model": row, **base_to_novel(logits[labelled], labels, num_base)})
        sets.append(entry)
        if verdict is None and given["teacher"] is not None:
            entry["difference"] = _paired(given["teacher"][labelled], given["target"][labelled], labels, num_base)
            verdict = _verdict(entry)
    return {"sets": sets, **(verdict or {"decided_on": None, "transfer_likely_helps": None, "warning": None,
                                         "summary": "teacher check not available: the teacher has no logits on "
                                                    "labelled images (few-shot or test)"})}


def _paired(teacher, target, labels, num_base: int | None) -> dict[str, Any]:
    """Teacher minus target zero-shot, image by image, on the base-class images (every image,
    argmax over every task class, where the set has no base-class image)."""
    labels = labels.numpy() if hasattr(labels, "numpy") else labels
    teacher, target = (t.numpy() if hasattr(t, "numpy") else t for t in (teacher, target))
    split = num_base_classes(teacher.shape[1]) if num_base is None else num_base
    base = labels < split
    if base.any():
        scope, right_teacher = "base", correct_per_image(teacher, labels, split)[base]
        right_target = correct_per_image(target, labels, split)[base]
    else:
        scope, right_teacher, right_target = "all", teacher.argmax(1) == labels, target.argmax(1) == labels
    table = (int((right_target & right_teacher).sum()), int((right_target & ~right_teacher).sum()),
             int((~right_target & right_teacher).sum()), int((~right_target & ~right_teacher).sum()))
    low, high = paired_difference_interval(*table)
    return {"scope": scope, "images": int(len(right_teacher)), "low": 100 * low, "high": 100 * high,
            "target_only": table[1], "teacher_only": table[2]}


def _verdict(entry: dict[str, Any]) -> dict[str, Any]:
    """Teacher against target zero-shot on the base classes (all task classes if the set has
    no base-class image), by the interval of their paired difference."""
    teacher, target, difference = entry["rows"][0], entry["rows"][1], entry["difference"]
    scope = difference["scope"]
    where = f"the {entry['samples']} {entry['images']} images"
    scope_words = "base classes" if scope == "base" else "task classes"
    figures = (f"teacher {teacher[scope]:.1f}% vs target zero-shot {target[scope]:.1f}% on the {scope_words} of {where}; "
               f"difference [{difference['low']:+.1f}, {difference['high']:+.1f}] points")
    decided = {"decided_on": entry["images"], "scope": scope, "difference": difference}
    if difference["low"] > 0:
        return {**decided, "transfer_likely_helps": True, "warning": None,
                "summary": f"the fine-tuned teacher beats the target's zero-shot ({figures}): transfer can help"}
    if difference["high"] > 0:
        return {**decided, "transfer_likely_helps": None, "warning": None,
                "summary": f"cannot tell with {count_of_images(difference['images'])} whether transfer helps ({figures}): "
                           "the interval holds 0; more labelled images would decide it"}
    warning = (f"transfer is unlikely to help: the fine-tuned teacher is not better than the target's zero-shot "
               f"({figures}); try TransMiter+ with labels (plus.enabled, more plus.shots) or fine-tune the weak "
               "model further. The artifacts were exported as usual.")
    return {**decided, "transfer_likely_helps": False, "warning": warning, "summary": warning}


def teacher_check_step(run) -> dict[str, Any]:
    """The export's ``teacher-check`` step (an export ``_Run`` after its transfer step): writes
    ``teacher_check.json`` beside the accuracy table, logs the warning on every run, returns
    the record."""
    from ..features.cache import zero_shot_logits

    splits = [split for split, _ in IMAGE_SETS if split in run.splits]
    out = run.root / CHECK_FILE
    k = len(run.classes)

    def check() -> None:
        adapter = run.adapter("transferred").adapter
        image_sets = {}
        for split, name in IMAGE_SETS:
            if split not in splits:
                continue
            target_cache = run.cache("target", split)
            target = zero_shot_logits(target_cache, run.head("target"))
            teacher = run.teacher(split)
            unavailable = teacher.extra.get("unavailable")
            with torch.no_grad():
                transmiter = adapter.task_logits(target)
            image_sets[name] = {"labels": target_cache.labels, "teacher": None if unavailable else teacher.logits,
                                "teacher_unavailable": unavailable, "target": target[:, :k], "transmiter": transmiter}
        write_json(out, teacher_check(image_sets, run.task.data.base_classes))

    run.steps.run("teacher-check", {"rule": "paired interval",
        "teacher": [run.cache_keys["teacher", split] for split in splits],
        "target": [run.cache_keys["target", split] for split in splits], "head": run.head_keys["target"],
        "transfer": run.keys["transfer"], "base_classes": run.task.data.base_classes}, [out], check)
    record = read_json(out, "teacher check")
    if record.get("warning"):
        run.log(f"warning: {run.task.name}: {record['warning']}")
    elif record.get("transfer_likely_helps") is None and record.get("decided_on"):
        run.log(f"note: {run.task.name}: {record['summary']}")
    return record
