"""Base-to-novel evaluation (the CoOp/CoCoOp protocol the paper reports).

Classes are split in halves, base = the first ceil(K/2). Base accuracy is
measured on base-class samples with the argmax restricted to base classes,
novel accuracy likewise on novel classes; HM = 2 B N / (B + N).
"""

from __future__ import annotations

import torch

from ..errors import InputError
# defined where torch is not needed (method/comparison.py imports numpy only)
from .comparison import harmonic_mean, num_base_classes  # noqa: F401


def subset_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: range) -> tuple[float | None, int]:
    """Accuracy (%) over samples whose label is in ``classes``, argmax over those classes only."""
    members = (labels >= classes.start) & (labels < classes.stop)
    count = int(members.sum())
    if count == 0:
        return None, 0
    predicted = logits[members][:, classes.start : classes.stop].argmax(dim=1) + classes.start
    return 100.0 * float((predicted == labels[members]).float().mean()), count

def base_to_novel(logits: torch.Tensor, labels: torch.Tensor, num_base: int | None = None) -> dict:
    """``{"base", "novel", "hm", "all", "num_base_samples", "num_novel_samples"}`` from task logits (N, K)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise InputError(f"need logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_classes = logits.shape[1]
    if (labels >= num_classes).any():
        raise InputError(f"labels must be below the {num_classes} classes of the logits")
    split = num_base_classes(num_classes) if num_base is None else num_base
    if not 0 < split <= num_classes:
        raise InputError(f"number of base classes must be in 1..{num_classes}, got {split}")
    base, num_base_samples = subset_accuracy(logits, labels, range(0, split))
    novel, num_novel_samples = subset_accuracy(logits, labels, range(split, num_classes))
    overall, _ = subset_accuracy(logits, labels, range(0, num_classes))
    return {
        "base": base,
        "novel": novel,
        "hm": harmonic_mean(base, novel),
        "all": overall,
        "num_base_classes": split,
        "num_base_samples": num_base_samples,
        "num_novel_samples": num_novel_samples,
    }
