"""Interleaved latency measurement.

Variants that are compared by ratio are timed in the same loop, one call of
each per round in a freshly shuffled order, so that drift in the machine's
speed (other tenants, frequency scaling, thermal state) hits all of them alike
instead of whichever happened to run during the slow minute. A round ends when
every variant has been called once; the loop stops after ``min_rounds`` once
``budget_s`` is spent, or at ``max_rounds``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class TimingPlan:
    warmup: int = 2
    min_rounds: int = 5
    max_rounds: int = 30
    budget_s: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_rounds < 1 or self.max_rounds < self.min_rounds or self.budget_s <= 0:
            raise InputError(f"timing plan needs warmup >= 0, 1 <= min_rounds <= max_rounds, budget > 0; got {self}")


def time_interleaved(calls: dict[Hashable, Callable[[], object]], plan: TimingPlan) -> dict[Hashable, list[float]]:
    """Seconds per call for every entry of ``calls`` (keyed by anything: a variant's name, or a
    runtime and variant); each callable must return only when its work is finished (GPU callables
    synchronise)."""
    if not calls:
        raise InputError("nothing to time")
    order = list(calls)
    for _ in range(plan.warmup):
        for name in order:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in order}
    shuffler = random.Random(plan.seed)
    started = time.perf_counter()
    rounds = 0
    while rounds < plan.max_rounds and (rounds < plan.min_rounds or time.perf_counter() - started < plan.budget_s):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    return samples


def summarise(seconds: list[float], batch: int) -> dict:
    """p50/p90/p99 latency in milliseconds, throughput at the median, and the samples."""
    if not seconds:
        raise InputError("no timings to summarise")
    ms = np.asarray(seconds) * 1000.0
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "rounds": len(seconds), "images_per_s": batch * 1000.0 / p50,
            "samples_ms": [round(float(v), 4) for v in ms]}  # in round order: paired ratios need them
