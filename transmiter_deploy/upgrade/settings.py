"""What an upgrade's cost measurement does, importable without torch (the CLI's defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencySettings:
    """Old and new fp32 graphs timed in one interleaved loop (upgrade/judge.py)."""

    batches: tuple[int, ...] = (1, 8)
    budget_s: float = 5.0  # per batch size, both graphs together
    min_rounds: int = 5
    threads: int | None = None  # None: the runtime's default

    def enabled(self) -> bool:
        return bool(self.batches)
