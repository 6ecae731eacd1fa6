"""The accuracy gate of a calibrated precision (int8): its graph against the fp32 graph on the
same images.

Where the images are labelled, the gate judges accuracy, as MLPerf's inference rules judge a
quantised model (relative to fp32, not by agreement): base, novel and HM each within the
precision's allowed points of fp32's and at least its relative share of fp32's (99% for int8).
Top-1 agreement is reported beside them and is a criterion only where the recipe asks for it
(``export.calibration.agreement``): on a few dozen images every flip is a point or more, and the
flips of a good int8 graph are near-ties that move accuracy either way. Unlabelled images can
only be judged by agreement: there it is the criterion, at the precision's top-1 bound unless
the recipe sets its own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import VerificationError
from ..method.evaluation import base_to_novel
from ..runtimes.compare import compare_outputs
from ..runtimes.registry import Precision

METRICS = ("base", "novel", "hm")


@dataclass
class GateImages:
    """Preprocessed images to gate on, with their labels when the recipe has a test split."""

    pixels: np.ndarray
    labels: np.ndarray | None  # None: agreement only (held-out unlabelled images)
    num_base: int | None = None
    description: str = "test images"
    agreement: float | None = None  # the recipe's stricter criterion: top-1 agreement at least this
    # why accuracy means nothing here (a target of random weights scores chance, and its near-tied
    # logits flip either way under int8): the criteria are reported, only finite outputs required
    advisory: str | None = None


class GateFailed(VerificationError):
    """A converted graph that fails its gate; ``record`` is the gate's table."""

    def __init__(self, message: str, record: dict) -> None:
        super().__init__(message)
        self.record = record


def accuracy_gate(reference: np.ndarray, candidate: np.ndarray, target: Precision, images: GateImages) -> dict:
    """The gate's table: agreement, accuracy of both graphs, each criterion and the verdict."""
    result = compare_outputs(reference, candidate)
    criteria, accuracy = [], {}
    if images.labels is not None:
        labels = torch.from_numpy(images.labels)
        accuracy = {name: base_to_novel(torch.from_numpy(logits), labels, images.num_base)
                    for name, logits in (("fp32", reference), (target.name, candidate))}
        criteria = accuracy_criteria(accuracy["fp32"], accuracy[target.name], target)
    bound = images.agreement if images.agreement is not None else (target.top1 if images.labels is None else None)
    if bound is not None:
        criteria.insert(0, {"criterion": f"top-1 agreement >= {bound:.1%}", "value": result["top1_agreement"],
                            "passed": result["finite"] and result["top1_agreement"] >= bound})
    met = all(c["passed"] for c in criteria)
    record = {"precision": target.name, "images": images.description, "samples": int(reference.shape[0]),
              "labelled": images.labels is not None, "max_abs": result["max_abs"],
              "top1_agreement": result["top1_agreement"], "accuracy": accuracy, "criteria": criteria,
              "passed": result["finite"] and (met or images.advisory is not None)}
    if images.advisory is not None:
        record.update(advisory=images.advisory, criteria_met=met)
    return record


def accuracy_criteria(fp32: dict, candidate: dict, target: Precision) -> list[dict]:
    """Per metric (base, novel, HM; those the split has): the candidate's accuracy within
    ``target.accuracy_points`` of fp32's and at least ``target.accuracy_relative`` of it. The value
    is the difference in points."""
    criteria = []
    for metric in METRICS:
        before, after = fp32.get(metric), candidate.get(metric)
        if before is None or after is None:
            continue
        rules = [f"within {target.accuracy_points} points"] if target.accuracy_points is not None else []
        passed = target.accuracy_points is None or abs(after - before) <= target.accuracy_points
        if target.accuracy_relative is not None:
            rules.append(f">= {target.accuracy_relative:.0%}")
            passed = passed and after >= target.accuracy_relative * before
        criteria.append({"criterion": f"{metric} {' and '.join(rules)} of fp32", "value": after - before,
                         "passed": passed})
    return criteria
