"""Runtimes behind one small interface, and one comparator for parity tables.

A runner takes a float32 batch shaped like the graph's input and returns the
graph's output as a float32 array. Every runner checks its input the same way
(dtype, rank, fixed dimensions, batch range) and refuses a mismatch in one
line, so a wrong array never reaches a runtime that would crash or silently
broadcast. ``compare`` produces a parity row from any two runners with the
tolerance of the candidate's precision.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .errors import DependencyError, InputError
from .parity import compare_outputs

# max |candidate - fp32 reference| on logits, and minimum top-1 agreement, per precision
TOLERANCES = {
    "fp32": {"max_abs": 1e-4, "top1": 1.0},
    # mixed fp16: logits reach ~100 (CLIP's logit scale), so absolute error is judged by top-1
    "fp16": {"max_abs": None, "top1": 0.995},
}


@dataclass(frozen=True)
class InputSpec:
    """What a runner accepts: float32, this rank, these fixed sizes (None = the batch axis)."""

    name: str
    shape: tuple[int | None, ...]
    min_batch: int = 1
    max_batch: int | None = None

    def check(self, array: np.ndarray, runner: str) -> None:
        if not isinstance(array, np.ndarray):
            raise InputError(f"{runner}: input must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise InputError(f"{runner}: input '{self.name}' must be float32, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise InputError(f"{runner}: input '{self.name}' must have rank {len(self.shape)} "
                             f"{self._describe()}, got shape {tuple(array.shape)}")
        for axis, (want, got) in enumerate(zip(self.shape[1:], array.shape[1:]), start=1):
            if want is not None and want != got:
                raise InputError(f"{runner}: input '{self.name}' must be {self._describe()}, "
                                 f"got {tuple(array.shape)} (axis {axis})")
        batch = array.shape[0]
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            upper = self.max_batch if self.max_batch is not None else "any"
            raise InputError(f"{runner}: batch {batch} is outside {self.min_batch}..{upper}")

    def _describe(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.shape) + ")"


class Runner(Protocol):
    name: str  # the runtime, e.g. onnxruntime-cpu
    graph: str  # what it runs, e.g. model_fp16.onnx
    precision: str
    input_spec: InputSpec

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """A PyTorch module (the fused classifier or the head) on CPU or CUDA."""

    def __init__(self, module: torch.nn.Module, input_spec: InputSpec, device: str = "cpu") -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DependencyError("PyTorch runner: CUDA was asked for but no GPU is visible")
        self.module = module.to(device).eval()
        self.device, self.input_spec = device, input_spec
        self.name, self.precision, self.graph = f"pytorch-{device.split(':')[0]}", "fp32", type(module).__name__

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.input_spec.check(batch, self.name)
        return self.module(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


def onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxRuntimeRunner:
    """An ONNX graph on ONNX Runtime: CPU, CUDA or TensorRT execution provider, as installed."""

    PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}

    def __init__(self, path: Path, provider: str = "cpu", max_batch: int | None = None,
                 threads: int | None = None, spinning: bool = True) -> None:
        """``threads`` and ``spinning`` as in :func:`transmiter_deploy.onnx_export.ort_session`."""

        if provider not in self.PROVIDERS:
            raise InputError(f"unknown ONNX Runtime provider '{provider}' (known: {', '.join(self.PROVIDERS)})")
        if self.PROVIDERS[provider] not in onnxruntime_providers():
            raise DependencyError(f"ONNX Runtime here has no {self.PROVIDERS[provider]} "
                                  f"(available: {', '.join(onnxruntime_providers())})")
        if provider != "cpu" and not torch.cuda.is_available():
            raise DependencyError(f"ONNX Runtime's {self.PROVIDERS[provider]} needs a CUDA GPU; none is visible")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX graph not found: {path}")
        from .onnx_export import ort_session

        self.precision = "fp16" if "fp16" in path.name else "fp32"
        try:
            self.session = ort_session(path, self.precision == "fp16", self.PROVIDERS[provider], threads, spinning)
        except Exception as exc:  # ORT raises its own exception types for corrupt graphs
            raise InputError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        if self.PROVIDERS[provider] not in self.session.get_providers():
            # onnxruntime-gpu lists CUDA on machines without a GPU, then quietly runs on the CPU
            raise DependencyError(f"ONNX Runtime could not start {self.PROVIDERS[provider]} here "
                                  f"(it would run on {', '.join(self.session.get_providers())})")
        graph_input = self.session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.input_spec = InputSpec(graph_input.name, shape, max_batch=max_batch)
        self.name, self.graph = f"onnxruntime-{provider}", path.name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.input_spec.check(batch, self.name)
        return np.asarray(self.session.run(None, {self.input_spec.name: batch})[0], dtype=np.float32)


def tensorrt_available() -> str | None:
    """None when TensorRT engines can run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def compare(reference: Runner, candidate: Runner, batch: np.ndarray) -> dict:
    """One parity row: ``candidate`` against ``reference`` on the same batch, judged by the
    tolerance of the candidate's precision."""
    expected, actual = reference.infer(batch), candidate.infer(batch)
    result = compare_outputs(expected, actual)
    tolerance = TOLERANCES[candidate.precision]
    passed = result["finite"] and result["top1_agreement"] >= tolerance["top1"]
    if tolerance["max_abs"] is not None:
        passed = passed and result["max_abs"] <= tolerance["max_abs"]
    return {"reference": reference.name, "candidate": candidate.name, "precision": candidate.precision,
            "batch": int(batch.shape[0]), **result, "tolerance": tolerance, "passed": bool(passed)}
