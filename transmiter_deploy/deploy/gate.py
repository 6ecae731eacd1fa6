"""The accuracy gate of a calibrated precision (int8): its graph against the fp32 graph on the
same images, by top-1 agreement and, where the images are labelled, by base, novel and HM
accuracy each within the precision's allowed points."""

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


class GateFailed(VerificationError):
    """A converted graph that fails its gate; ``record`` is the gate's table."""

    def __init__(self, message: str, record: dict) -> None:
        super().__init__(message)
        self.record = record


def accuracy_gate(reference: np.ndarray, candidate: np.ndarray, target: Precision, images: GateImages) -> dict:
    """The gate's table: agreement, accuracy of both graphs, each criterion and the verdict."""
    result = compare_outputs(reference, candidate)
    criteria = [{"criterion": f"top-1 agreement >= {target.top1:.0%}", "value": result["top1_agreement"],
                 "passed": result["finite"] and result["top1_agreement"] >= target.top1}]
    accuracy = {}
    if images.labels is not None:
        labels = torch.from_numpy(images.labels)
        accuracy = {name: base_to_novel(torch.from_numpy(logits), labels, images.num_base)
                    for name, logits in (("fp32", reference), (target.name, candidate))}
        for metric in METRICS:
            before, after = accuracy["fp32"][metric], accuracy[target.name][metric]
            if before is None or after is None:
                continue
            criteria.append({"criterion": f"{metric} within {target.accuracy_points} points of fp32",
                             "value": after - before, "passed": abs(after - before) <= target.accuracy_points})
    return {"precision": target.name, "images": images.description, "samples": int(reference.shape[0]),
            "labelled": images.labels is not None, "max_abs": result["max_abs"],
            "top1_agreement": result["top1_agreement"], "accuracy": accuracy, "criteria": criteria,
            "passed": all(c["passed"] for c in criteria)}
