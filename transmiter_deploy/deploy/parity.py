"""The parity table of an export, and the graph runs it is made of.

Every graph an export writes is run through the registry's verification runtime
(``registry.verification_runtime()``: ONNX Runtime on the CPU), by its runner (``runtimes/``),
never through a session opened here: the checks every runtime makes before reading a graph
(external data, precision, Q/DQ scales) apply to the export's own runs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtimes.base import GraphFile, GraphInMemory, Runner
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION, Precision, verification_runtime

FP32_LOGIT_ATOL = PRECISIONS[REFERENCE_PRECISION].max_abs


class Checks(dict):
    """The parity table: name -> comparison, verdict, whether it gates the export, criterion."""

    def add(self, name: str, result: dict, passed: bool, required: bool, criterion: str) -> None:
        self[name] = {**result, "passed": bool(passed), "required": required, "criterion": criterion}


@dataclass
class References:
    """What PyTorch computed on the parity images: validation compares every runtime to it."""

    pixels: np.ndarray  # preprocessed parity images
    outputs: np.ndarray  # the fused classifier's outputs (logits, or probabilities with softmax)


def tolerance_criterion(target: Precision) -> str:
    """``target``'s registry tolerance against fp32, as the parity table states it."""
    return f"finite, top-1 agreement >= {target.top1:.1%}" + (
        f", max_abs <= {target.max_abs}" if target.max_abs is not None else "") + " (ONNX Runtime CPU)"


def graph_runner(graph: Path | GraphFile | GraphInMemory) -> Runner:
    """A runner (not yet active) of ``graph`` on the verification runtime."""
    return verification_runtime().create(graph)


def run_graph(graph: Path | GraphFile | GraphInMemory, batch: np.ndarray) -> np.ndarray:
    """``graph``'s first output on ``batch`` (float32), on the verification runtime."""
    with graph_runner(graph) as runner:
        return runner.infer(batch)


def run_graph_outputs(graph: Path | GraphFile, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``graph`` on ``batch``, by name (a task bank has one per task)."""
    with graph_runner(graph) as runner:
        return runner.infer_outputs(batch)
