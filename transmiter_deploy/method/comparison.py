"""Two classifiers judged on the same images, image by image (docs/upgrade.md).

Average accuracy hides what a model update breaks: images the old model got right and the new one
gets wrong (negative flips). With the few hundred labelled images a team has, a point of accuracy
is often noise, so every figure here carries its 95% interval and the verdict says "cannot tell"
where the interval allows both answers:

* a proportion (an accuracy, a flip rate): Wilson's score interval;
* the paired difference of two accuracies: Newcombe's hybrid score interval for paired
  proportions (method 10 of Newcombe 1998; the one Fagerland, Lydersen and Laake 2014 recommend),
  built from the two Wilson intervals and the correlation of the pairs;
* whether the difference is real: McNemar's exact test, the two-sided binomial test of the
  discordant pairs b (right before, wrong after) against b + c at 1/2;
* the harmonic mean of base and novel accuracy: a seeded percentile bootstrap, base and novel
  images resampled apart (they are different images).

Written here rather than taken from SciPy, which the runtime does not otherwise need; the tests
check each against SciPy's ``binomtest`` and its Wilson interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000
VERDICTS = ("better", "not worse", "worse", "cannot tell")
REQUIREMENTS = ("better", "not-worse", "any")  # what a task's verdict must be for the upgrade to go ahead


def count_of_images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion; (0, 1) when there is no trial."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # at 0 or all successes the bound is exactly 0 or 1; rounding must not move it across
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == trials else min(1.0, centre + half))


def _log_binomial_pmf(k: int, n: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test: ``b`` of the ``b + c`` discordant pairs went one
    way, against a fair coin. 1 when there is no discordant pair."""
    n = b + c
    if n == 0:
        return 1.0
    tail = min(b, c)
    # the binomial at 1/2 is symmetric: the two-sided p is twice the smaller tail, capped at 1
    logs = [_log_binomial_pmf(k, n) for k in range(tail + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))


def paired_difference_interval(both: int, before_only: int, after_only: int, neither: int,
                               z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of accuracy(after) - accuracy(before) on the same images,
    from the 2x2 table of right/wrong pairs: ``both`` right, right ``before_only``, right
    ``after_only``, ``neither``."""
    n = both + before_only + after_only + neither
    if n == 0:
        return -1.0, 1.0
    p_before, p_after = (both + before_only) / n, (both + after_only) / n
    low_b, high_b = wilson_interval(both + before_only, n, z)
    low_a, high_a = wilson_interval(both + after_only, n, z)
    margins = (both + before_only) * (after_only + neither) * (both + after_only) * (before_only + neither)
    phi = 0.0 if margins == 0 else (both * neither - before_only * after_only) / math.sqrt(margins)
    difference = p_after - p_before
    lower = (p_after - low_a) ** 2 - 2 * phi * (p_after - low_a) * (high_b - p_before) + (high_b - p_before) ** 2
    upper = (high_a - p_after) ** 2 - 2 * phi * (high_a - p_after) * (p_before - low_b) + (p_before - low_b) ** 2
    return max(-1.0, difference - math.sqrt(max(lower, 0.0))), min(1.0, difference + math.sqrt(max(upper, 0.0)))


def proportion(successes: int, trials: int) -> dict[str, Any]:
    """A proportion with its Wilson interval, as the reports write it (None without trials)."""
    low, high = wilson_interval(successes, trials)
    return {"value": successes / trials if trials else None, "low": low, "high": high,
            "count": int(successes), "of": int(trials)}


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    """HM = 2 B N / (B + N) of base and novel accuracy (None without both)."""
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def num_base_classes(num_classes: int) -> int:
    """Base classes are the first half, rounded up (the CoOp/CoCoOp split)."""
    return math.ceil(num_classes / 2)


def hm_interval(base_correct: np.ndarray, novel_correct: np.ndarray, seed: int = 0,
                resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the harmonic mean of base and novel accuracy, each set
    resampled on its own (a seeded generator: the same images give the same interval)."""
    if not len(base_correct) or not len(novel_correct):
        only = base_correct if len(base_correct) else novel_correct
        return wilson_interval(int(np.sum(only)), len(only))
    rng = np.random.default_rng(seed)
    base = rng.choice(base_correct.astype(np.float64), size=(resamples, len(base_correct))).mean(axis=1)
    novel = rng.choice(novel_correct.astype(np.float64), size=(resamples, len(novel_correct))).mean(axis=1)
    total = base + novel
    hm = np.divide(2 * base * novel, total, out=np.zeros_like(total), where=total > 0)
    return float(np.quantile(hm, 0.025)), float(np.quantile(hm, 0.975))


@dataclass(frozen=True)
class VerdictRules:
    """What decides a task's verdict (``transmiter upgrade``'s options, with these defaults)."""

    margin: float = 0.01  # "not worse": the accuracy difference's interval lies above -margin
    max_negative_flips: float = 0.02  # more images right before and wrong after than this share: worse
    require: str = "not-worse"  # what every task (not accepted by name) must reach: better, not-worse, any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def met(self, verdict: str) -> bool:
        if self.require == "any":
            return True
        return verdict == "better" or (self.require == "not-worse" and verdict == "not worse")


def verdict(difference_interval: tuple[float, float], negative_flips: dict[str, Any], images: int,
            rules: VerdictRules) -> tuple[str, str]:
    """better / not worse / worse / cannot tell, and why, from the paired difference's interval and
    the negative flips (a :func:`proportion`). Worse needs evidence: the flip rate's interval above
    the rule's maximum, or the difference's interval below 0 and reaching -margin; a flip rate above
    the maximum whose interval still reaches it leaves the verdict open."""
    low, high = difference_interval
    spread = f"difference [{100 * low:+.1f}, {100 * high:+.1f}] points"
    flip_words = (f"negative flips {100 * (negative_flips['value'] or 0.0):.1f}% "
                  f"[{100 * negative_flips['low']:.1f}, {100 * negative_flips['high']:.1f}]")
    limit = f"{100 * rules.max_negative_flips:g}%"
    if negative_flips["low"] > rules.max_negative_flips:
        return "worse", f"{flip_words} above the {limit} allowed"
    if high < 0 and low <= -rules.margin:
        return "worse", f"{spread}, below 0"
    flips_allowed = (negative_flips["value"] or 0.0) <= rules.max_negative_flips
    if flips_allowed and low > 0:
        return "better", f"{spread}, above 0"
    if flips_allowed and low > -rules.margin:
        return "not worse", f"{spread}, above -{100 * rules.margin:g}"
    reason = spread + (f" spans -{100 * rules.margin:g} and 0" if flips_allowed else f"; {flip_words}, "
                       f"above {limit} but its interval reaches it")
    return "cannot tell", f"cannot tell with {count_of_images(images)}: {reason}"


def correct_per_image(logits: np.ndarray, labels: np.ndarray, num_base: int) -> np.ndarray:
    """Right or wrong per labelled image as base-to-novel scores it: a base-class image by the
    argmax over the base classes, a novel-class image over the novel classes (method/evaluation.py)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    base = labels < num_base
    right = np.zeros(len(labels), dtype=bool)
    if base.any():
        right[base] = logits[base][:, :num_base].argmax(axis=1) == labels[base]
    if (~base).any():
        right[~base] = logits[~base][:, num_base:].argmax(axis=1) + num_base == labels[~base]
    return right


def compare_labelled(before: np.ndarray, after: np.ndarray, labels: np.ndarray, num_base: int,
                     rules: VerdictRules, seed: int = 0) -> dict[str, Any]:
    """Old (``before``) against new (``after``) task logits on the same labelled images: accuracy per
    split with intervals, the paired difference with McNemar's test, agreement and flips, verdict."""
    labels = np.asarray(labels)
    right_b, right_a = correct_per_image(before, labels, num_base), correct_per_image(after, labels, num_base)
    base = labels < num_base
    n = len(labels)

    def side(right: np.ndarray) -> dict[str, Any]:
        b, v = right[base], right[~base]
        return {"base": proportion(int(b.sum()), len(b)), "novel": proportion(int(v.sum()), len(v)),
                "hm": {"value": harmonic_mean(float(b.mean()) if len(b) else None, float(v.mean()) if len(v) else None),
                       **dict(zip(("low", "high"), hm_interval(b, v, seed)))},
                "all": proportion(int(right.sum()), n)}

    both, before_only = int((right_b & right_a).sum()), int((right_b & ~right_a).sum())
    after_only, neither = int((~right_b & right_a).sum()), int((~right_b & ~right_a).sum())
    interval = paired_difference_interval(both, before_only, after_only, neither)
    flips = proportion(before_only, n)
    decided, why = verdict(interval, flips, n, rules)
    return {"labelled": True, "images": n, "before": side(right_b), "after": side(right_a),
            "difference": {"value": (after_only - before_only) / n if n else None, "low": interval[0],
                           "high": interval[1], "mcnemar_p": mcnemar_exact(before_only, after_only),
                           "table": {"both": both, "before_only": before_only, "after_only": after_only,
                                     "neither": neither}},
            "agreement": proportion(int((np.asarray(before).argmax(1) == np.asarray(after).argmax(1)).sum()), n),
            "negative_flips": flips, "positive_flips": proportion(after_only, n),
            "verdict": decided, "why": why}


def compare_unlabelled(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Without labels only agreement and the shift of the predicted-class distribution (total
    variation distance between the two histograms) can be said."""
    predicted_b, predicted_a = np.asarray(before).argmax(1), np.asarray(after).argmax(1)
    n, classes = len(predicted_b), np.asarray(before).shape[1]
    histogram_b = np.bincount(predicted_b, minlength=classes) / max(n, 1)
    histogram_a = np.bincount(predicted_a, minlength=classes) / max(n, 1)
    return {"labelled": False, "images": n, "agreement": proportion(int((predicted_b == predicted_a).sum()), n),
            "prediction_shift": float(0.5 * np.abs(histogram_b - histogram_a).sum()),
            "verdict": "cannot tell",
            "why": f"the {n} test images are unlabelled: agreement and the predicted-class shift only"}
