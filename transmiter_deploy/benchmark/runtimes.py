"""The runtimes a benchmark can time, and how one call of a variant looks on each.

CPU: PyTorch eager and ONNX Runtime's CPU provider, always. GPU (only where an
NVIDIA GPU is visible): PyTorch eager on CUDA, PyTorch with CUDA graphs, ONNX
Runtime's CUDA provider, and TensorRT engines. A runtime that cannot run here
is skipped with its reason, never faked. PyTorch on CUDA keeps inputs and outputs
on the GPU; ONNX Runtime CUDA and TensorRT take and return host arrays, so their
times include the copies (recorded as ``includes_copies``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DependencyError
from .variants import TargetGroup, Variant

CPU_RUNTIMES = ("pytorch-cpu", "onnxruntime-cpu")
GPU_RUNTIMES = ("pytorch-cuda", "pytorch-cuda-graphs", "onnxruntime-cuda", "tensorrt")
RUNTIMES = CPU_RUNTIMES + GPU_RUNTIMES
INCLUDES_COPIES = {"onnxruntime-cuda", "tensorrt"}


def unavailable(runtime: str) -> str | None:
    """None when ``runtime`` can run here, else the reason it cannot."""
    if runtime in CPU_RUNTIMES:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if runtime == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"this ONNX Runtime build has no CUDA provider ({ort.get_device()})"
    if runtime == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    return None


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
        self._sessions: dict[str, object] = {}
        self._engines: dict[str, object] = {}
        if self.runtime.startswith("pytorch-cuda"):
            for module in self.group.modules():
                module.to("cuda")

    def release(self) -> None:
        """Free sessions and GPU memory before the next runtime."""
        self._sessions.clear()
        self._engines.clear()
        if self.runtime.startswith("pytorch-cuda"):
            for module in self.group.modules():
                module.to("cpu")
            torch.cuda.empty_cache()

    def call(self, variant: Variant, batch: int) -> Callable[[], object]:
        example = self.group.example(variant.takes, batch)
        if self.runtime == "pytorch-cpu":
            return self._torch_call(variant, example)
        if self.runtime == "pytorch-cuda":
            eager = self._torch_call(variant, example.to("cuda"))
            return lambda: (eager(), torch.cuda.synchronize())
        if self.runtime == "pytorch-cuda-graphs":  # pragma: no cover - needs a GPU
            return self._cuda_graph_call(variant, example.to("cuda"))
        if self.runtime in ("onnxruntime-cpu", "onnxruntime-cuda"):
            return self._onnxruntime_call(variant, example.numpy())
        if self.runtime == "tensorrt":  # pragma: no cover - needs TensorRT and a GPU
            return self._tensorrt_call(variant, example.numpy())
        raise DependencyError(f"unknown runtime '{self.runtime}'")

    @staticmethod
    def _torch_call(variant: Variant, example: torch.Tensor) -> Callable[[], object]:
        modules = [part.module for part in variant.parts]

        def run():
            with torch.inference_mode():
                return variant.combine([module(example) for module in modules])

        return run

    def _cuda_graph_call(self, variant: Variant, example: torch.Tensor) -> Callable[[], object]:  # pragma: no cover
        modules = [part.module for part in variant.parts]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                variant.combine([module(example) for module in modules])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            variant.combine([module(example) for module in modules])
        return lambda: (graph.replay(), torch.cuda.synchronize())

    def _onnxruntime_call(self, variant: Variant, example: np.ndarray) -> Callable[[], object]:
        from ..runners import OnnxRuntimeRunner

        provider = "cuda" if self.runtime == "onnxruntime-cuda" else "cpu"
        runners = []
        for index, part in enumerate(variant.parts):
            # one session per part, even when two parts share a graph file (EFT's two source towers)
            key = f"{variant.name}/{index}"
            if key not in self._sessions:
                # Without spinning: the sessions of all variants take turns in this process, and an
                # idle session's spinning pool would compete with the one being timed.
                self._sessions[key] = OnnxRuntimeRunner(self.graphs[part.graph_key], provider,
                                                        threads=self.threads, spinning=False)
            runners.append(self._sessions[key])
        return lambda: variant.combine([runner.infer(example) for runner in runners])

    def _tensorrt_call(self, variant: Variant, example: np.ndarray):  # pragma: no cover - needs TensorRT
        from ..tensorrt_engine import BatchProfile, TensorRTRunner, build_engine

        runners = []
        for index, part in enumerate(variant.parts):
            key = f"{variant.name}/{index}"
            if key not in self._engines:
                engine = self.work_dir / "engines" / f"{part.graph_key}-max{self.max_batch}.plan"
                if not engine.is_file():
                    profile = BatchProfile(1, self.max_batch, self.max_batch)
                    build_engine(self.graphs[part.graph_key], engine, profile, log=lambda _: None)
                self._engines[key] = TensorRTRunner(engine)
            runners.append(self._engines[key])
        return lambda: variant.combine([runner.infer(example) for runner in runners])
