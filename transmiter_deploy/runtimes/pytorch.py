"""PyTorch: a module (the fused classifier, a head, a benchmark variant) on CPU or CUDA.

The reference runtime: every other runtime is compared against PyTorch on the CPU.
On CUDA a runner can also replay the call as a CUDA graph (one capture per input
shape), which removes the per-kernel launch cost that eager mode pays at small batch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from ..errors import DependencyError, InputError
from .base import InputSpec, Runner, RunSettings
from .registry import REFERENCE_PRECISION

ModuleSource = torch.nn.Module | Callable[[], torch.nn.Module]


class TorchRunner(Runner):
    """``source`` is a module, or a zero-argument loader that builds one on activation (then
    deactivation drops it); a given module is moved to the device on activation and back
    to the CPU on deactivation, so the caller's module is where it was. ``input_spec``: what
    the module takes (a module, unlike a graph, does not say). ``device`` and ``cuda_graphs``
    come from the registry entry. ``settings.threads`` is not applied: PyTorch's thread count
    is the whole process's, which a runner must not change under its caller."""

    def __init__(self, source: ModuleSource, settings: RunSettings = RunSettings(), input_spec: InputSpec | None = None,
                 device: str = "cpu", cuda_graphs: bool = False) -> None:
        super().__init__()
        if input_spec is None:
            raise InputError("a PyTorch runner needs the input spec of its module")
        if settings.max_batch is not None:
            input_spec = replace(input_spec, max_batch=settings.max_batch)
        reason = self.unavailable(device=device, cuda_graphs=cuda_graphs)
        if reason is not None:
            raise DependencyError(f"PyTorch runner: {reason}")
        self.source, self.device, self.cuda_graphs, self.input_spec = source, device, cuda_graphs, input_spec
        kind = device.split(":")[0]
        self.name = f"pytorch-{kind}" + ("-graphs" if cuda_graphs else "")
        self.precision = REFERENCE_PRECISION
        self.graph = type(source).__name__ if isinstance(source, torch.nn.Module) else getattr(source, "__name__", "module")
        self.module: torch.nn.Module | None = None

    @classmethod
    def unavailable(cls, device: str = "cpu", cuda_graphs: bool = False, **_: object) -> str | None:
        if (device.startswith("cuda") or cuda_graphs) and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None

    def activate_impl(self) -> None:
        module = self.source if isinstance(self.source, torch.nn.Module) else self.source()
        self.module = module.to(self.device).eval()
        self.graph = type(module).__name__

    def deactivate_impl(self) -> None:
        if isinstance(self.source, torch.nn.Module) and self.device != "cpu":
            self.source.to("cpu")
        self.module = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.outputs_impl(batch).values()))

    @torch.no_grad()
    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """A module returns a tensor, or a dict of named tensors (a task bank's outputs)."""
        if self.cuda_graphs:  # pragma: no cover - needs a GPU
            self.timed_call(batch)()
            result = self._graph_output
        else:
            result = self.module(torch.from_numpy(batch).to(self.device))
        named = result if isinstance(result, dict) else {"output": result}
        return {name: value.float().cpu().numpy() for name, value in named.items()}

    def timed_call(self, batch: np.ndarray) -> Callable[[], object]:
        """The input is placed on the device first; outputs stay there (no copies are timed)."""
        self._require_active()
        self.input_spec.check(batch, self.name)
        example = torch.from_numpy(batch).to(self.device)
        if self.cuda_graphs:  # pragma: no cover - needs a GPU
            return self._capture(example)
        module = self.module

        def run():
            with torch.inference_mode():
                return module(example)

        if self.device.startswith("cuda"):  # pragma: no cover - needs a GPU
            return lambda: (run(), torch.cuda.synchronize())
        return run

    def _capture(self, example: torch.Tensor) -> Callable[[], object]:  # pragma: no cover - needs a GPU
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                self.module(example)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._graph_output = self.module(example)
        return lambda: (graph.replay(), torch.cuda.synchronize())
