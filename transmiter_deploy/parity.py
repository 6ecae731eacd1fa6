"""Comparing two sets of outputs the way a deployment sign-off needs.

Absolute error alone means little for logits that reach ~100, so every
comparison also reports the error relative to the largest reference
magnitude and to each sample's own logit spread (std), plus top-1 agreement.
"""

from __future__ import annotations

import numpy as np


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict:
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    finite = bool(np.isfinite(candidate).all())
    diff = np.abs(reference - candidate)
    spread = reference.std(axis=1, ddof=1, keepdims=True) if reference.shape[1] > 1 else np.ones_like(reference[:, :1])
    return {
        "samples": int(reference.shape[0]),
        "finite": finite,
        "max_abs": float(diff.max()) if finite else float("inf"),
        "max_abs_over_max_reference": float(diff.max() / max(np.abs(reference).max(), 1e-30)) if finite else float("inf"),
        "max_abs_over_sample_std": float((diff / np.maximum(spread, 1e-30)).max()) if finite else float("inf"),
        "top1_agreement": float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()),
    }
