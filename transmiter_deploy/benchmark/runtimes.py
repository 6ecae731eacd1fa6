"""The runtimes a benchmark can time, and how one call of a variant looks on each.

The list is the registry's (:mod:`transmiter_deploy.runtimes.registry`): CPU runtimes
always, GPU runtimes only where an NVIDIA GPU is visible; a runtime that cannot run
here is skipped with its reason, never faked. Each call goes through the runtime's own
runner (its ``timed_call``), built by the registry from the runtime-neutral ``RunSettings``: PyTorch on CUDA keeps inputs and outputs on the GPU; ONNX
Runtime CUDA and TensorRT take and return host arrays, so their times include the
copies (recorded as ``includes_copies``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..runtimes.base import GraphFile, InputSpec, Runner, RunSettings
from ..runtimes import registry
from ..runtimes.registry import runtime as registered_runtime
from ..runtimes.registry import runtime_names
from .variants import TargetGroup, Variant

BENCH_RUNTIMES = runtime_names()
CPU_RUNTIMES = runtime_names("cpu")
GPU_RUNTIMES = runtime_names("cuda")
INCLUDES_COPIES = {name for name, entry in registry.RUNTIMES.items() if entry.includes_copies}


def unavailable(runtime: str) -> str | None:
    """None when ``runtime`` can run here, else the reason it cannot."""
    return registered_runtime(runtime).unavailable()


class VariantModule(nn.Module):
    """A variant's parts and their combination as one module, so a PyTorch runtime times (and
    a CUDA graph captures) the whole variant in one call."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.variant = variant
        self.parts = nn.ModuleList(part.module for part in variant.parts)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.variant.combine([part(inputs) for part in self.parts])


@dataclass
class Caller:
    """Builds, for one runtime, the zero-argument call that runs a variant on a batch."""

    runtime: str
    group: TargetGroup
    graphs: dict[str, Path]  # graph key -> exported ONNX file
    threads: int
    work_dir: Path
    max_batch: int  # TensorRT engines get one profile spanning 1..max_batch

    def __post_init__(self) -> None:
        self.entry = registered_runtime(self.runtime)
        self._runners: dict[str, list[Runner]] = {}

    def release(self) -> None:
        """Deactivate every runner (sessions, engines, GPU copies) before the next runtime."""
        for runners in self._runners.values():
            for runner in runners:
                runner.deactivate()
        self._runners.clear()

    def supports(self, variant: Variant) -> bool:
        """PyTorch runs the fp32 modules only; reduced precisions are graphs."""
        return self.entry.loads != "module" or variant.precision == "fp32"

    def call(self, variant: Variant, batch: int) -> Callable[[], object]:
        example = self.group.example(variant.takes, batch).numpy()
        runners = self._runners.get(variant.name)
        if runners is None:
            runners = self._runners[variant.name] = [runner.activate() for runner in self._build(variant)]
        calls = [runner.timed_call(example) for runner in runners]
        if len(calls) == 1:
            return calls[0]
        return lambda: variant.combine([call() for call in calls])

    def _build(self, variant: Variant) -> list[Runner]:
        """One runner for a PyTorch runtime (the whole variant as one module); one per part for
        graph runtimes, even when two parts share a graph file (EFT's two source towers). The
        runners of all variants take turns in this process (``shares_process``: an idle runner's
        threads must not compete with the one being timed); a runtime that compiles graphs keeps
        them per largest batch under the work folder."""
        settings = RunSettings(threads=self.threads, shares_process=True, max_batch=self.max_batch,
                               compiled_dir=self.work_dir / f"compiled-max{self.max_batch}")
        if self.entry.loads == "module":
            shape = (None, *self.group.example(variant.takes, 1).shape[1:])
            return [self.entry.create(VariantModule(variant), settings, input_spec=InputSpec(variant.takes, shape))]
        return [self.entry.create(GraphFile(self.graphs[part.graph_key], part.precision), settings)
                for part in variant.parts]
