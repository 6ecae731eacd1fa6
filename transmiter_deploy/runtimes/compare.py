"""Comparing two sets of outputs the way a deployment sign-off needs.

Absolute error alone means little for logits that reach ~100, so every
comparison also reports the error relative to the largest reference
magnitude and to each sample's own logit spread (std), plus top-1 agreement.
:func:`compare` judges a runner by the tolerance its precision has in the
registry, the one tolerance table of the toolkit (loosened where the runtime computes in a
lower arithmetic than the graph's, e.g. OpenVINO's bf16: ``Runtime.tolerance``).
"""

from __future__ import annotations

import numpy as np

from .registry import RUNTIMES, precision


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


def within_tolerance(result: dict, precision_name: str, runtime_name: str | None = None) -> bool:
    """Finite, top-1 agreement and (where the tolerance has one) max abs within the tolerance of
    the precision, loosened by the runtime's arithmetic (``runtime_name``, a registry name)."""
    tolerance = tolerance_of(precision_name, runtime_name)
    passed = result["finite"] and result["top1_agreement"] >= tolerance["top1"]
    if tolerance["max_abs"] is not None:
        passed = passed and result["max_abs"] <= tolerance["max_abs"]
    return bool(passed)


def tolerance_of(precision_name: str, runtime_name: str | None = None) -> dict[str, float | None]:
    """The registry's tolerance for a graph of ``precision_name`` run by ``runtime_name``."""
    if runtime_name in RUNTIMES:
        return RUNTIMES[runtime_name].tolerance(precision_name)
    return precision(precision_name).tolerance()


def judge(reference_name: str, expected: np.ndarray, candidate, actual: np.ndarray, batch: int) -> dict:
    """One parity row from outputs already computed (the reference's may come from a file)."""
    result = compare_outputs(expected, actual)
    return {"reference": reference_name, "candidate": candidate.name, "precision": candidate.precision,
            "batch": int(batch), **result, "tolerance": tolerance_of(candidate.precision, candidate.name),
            "passed": within_tolerance(result, candidate.precision, candidate.name)}


def compare(reference, candidate, batch: np.ndarray) -> dict:
    """One parity row: ``candidate`` against ``reference`` (both active runners) on the same
    batch, judged by the tolerance of the candidate's precision."""
    return judge(reference.name, reference.infer(batch), candidate, candidate.infer(batch), batch.shape[0])


def judge_outputs(reference_name: str, expected: dict[str, np.ndarray], candidate,
                  actual: dict[str, np.ndarray], batch: int) -> list[dict]:
    """One parity row per output of a multi-output graph (a task bank: one per task), matched
    by name; an output the candidate lacks is a failed row, not a skipped one."""
    rows = []
    for name, reference in expected.items():
        if name not in actual:
            rows.append({"reference": reference_name, "candidate": candidate.name, "precision": candidate.precision,
                         "batch": int(batch), "output": name, "passed": False,
                         "error": f"{candidate.graph} has no output '{name}'"})
            continue
        rows.append({"output": name, **judge(reference_name, reference, candidate, actual[name], batch)})
    return rows
