"""The bank sweep's checks: each composed bank against its parts, compact heads against fp32.

fp32 banks are checked against the backbone then each head run separately (required: max abs
<= the fp32 tolerance, top-1 100%, else the sweep stops); compact banks against the fp32 bank of
the same N, and the compact heads alone against their fp32 graphs (reported: weight-only
quantisation is not exact). The heads alone run on ONNX Runtime's CPU provider
(``HEAD_RUNTIME``), through the registry's runner, in memory.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import onnx

from ..deploy.bank import output_names
from ..deploy.parity import FP32_LOGIT_ATOL
from ..runtimes.base import GraphInMemory, Runner, RunSettings
from ..runtimes.compare import compare_outputs
from ..runtimes.registry import REFERENCE_PRECISION
from ..runtimes.registry import runtime as registered_runtime
from .bank_compact import COMPACT
from .bank_graphs import BankGraphs, weight_bytes
from .timing import TimingPlan, time_interleaved

# The heads alone run here: the compact heads' MatMulNBits is ONNX Runtime's own operator, and
# its CPU kernel is what they are made for; a bank's parts are checked on the same runtime.
HEAD_RUNTIME = "onnxruntime-cpu"
HEAD_CHECK_ROWS = 1024  # L2-normalised random features each compact head is compared on
HEAD_TIMING = TimingPlan(warmup=2, min_rounds=30, max_rounds=30, budget_s=1.0)


def head_runner(model: onnx.ModelProto, threads: int, name: str = "head") -> Runner:
    """A runner (not yet active) of a head graph held in memory on ``HEAD_RUNTIME``, sharing the
    process with the sweep's other runners. A compact head is not a registry precision (an fp32
    graph whose MLP MatMuls are MatMulNBits, no Q/DQ): it runs as fp32."""
    return registered_runtime(HEAD_RUNTIME).create(
        GraphInMemory(model.SerializeToString(), REFERENCE_PRECISION, name),
        RunSettings(threads=threads, shares_process=True))


def margins(logits: np.ndarray) -> np.ndarray:
    """Per row: the top logit minus the runner-up."""
    top = np.sort(logits, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def parts_check(outputs: dict[str, np.ndarray], features: np.ndarray, graphs: BankGraphs, tasks: int,
                threads: int) -> dict:
    """An fp32 bank's outputs against the backbone's ``features`` run through each head alone
    (the worst task's comparison; required)."""
    worst = None
    for task, head in graphs.heads[:tasks]:
        with head_runner(head, threads, task) as runner:
            parts = runner.infer(features)
        result = compare_outputs(parts, outputs[output_names(task, False)[0]])
        if worst is None or result["max_abs"] > worst["max_abs"] or result["top1_agreement"] < worst["top1_agreement"]:
            worst = result
    return {**worst, "required": True,
            "passed": worst["max_abs"] <= FP32_LOGIT_ATOL and worst["top1_agreement"] == 1.0,
            "criterion": f"every task: max_abs <= {FP32_LOGIT_ATOL}, top-1 agreement 100% (backbone, then the head, "
                         "each its own session)"}


def compact_check(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """A compact bank's outputs against the fp32 bank's of the same N on the same images, every
    task (reported): the worst task's agreement, and the rows whose top-1 flipped with how close
    their fp32 top two were."""
    results = [compare_outputs(reference[name], outputs[name]) for name in outputs]
    all_margins = np.concatenate([margins(reference[name]) for name in outputs])
    flipped = np.concatenate([margins(reference[name])[reference[name].argmax(1) != outputs[name].argmax(1)]
                              for name in outputs])
    return {"max_abs": max(r["max_abs"] for r in results),
            "max_abs_over_max_reference": max(r["max_abs_over_max_reference"] for r in results),
            "top1_agreement": min(r["top1_agreement"] for r in results),
            "samples": int(len(next(iter(outputs.values())))),
            "flipped": int(len(flipped)), "of": int(len(all_margins)),
            "flipped_max_fp32_margin": float(flipped.max()) if len(flipped) else None,
            "fp32_margin_median": float(np.median(all_margins)),
            "required": False, "passed": all(r["top1_agreement"] == 1.0 for r in results),
            "criterion": "every task: top-1 agreement 100% with the fp32 bank on the same images (reported)"}


def head_accuracy(graphs: BankGraphs, compact: dict[str, list], threads: int, batches: tuple[int, ...],
                  tasks: int = 4, plan: TimingPlan = HEAD_TIMING) -> dict:
    """Every compact setting on its own: the first ``tasks`` heads against their fp32 graphs on
    the same L2-normalised random features (max abs, top-1 agreement), and each head alone timed
    against the fp32 head (``HEAD_RUNTIME``, one interleaved loop per batch)."""
    rows = np.random.default_rng(0).standard_normal((HEAD_CHECK_ROWS, graphs.feature_dim)).astype(np.float32)
    features = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    out = {}
    with ExitStack() as fp32_stack:
        fp32 = [fp32_stack.enter_context(head_runner(head, threads, name)) for name, head in graphs.heads[:tasks]]
        references = [runner.infer(features) for runner in fp32]
        for name, heads in compact.items():
            with ExitStack() as stack:
                runners = [stack.enter_context(head_runner(head, threads, task)) for task, head in heads[:tasks]]
                accuracy = _agreement(references, [runner.infer(features) for runner in runners])
                timing = {str(batch): _head_alone_ms(fp32[0], runners[0], name, features[:batch], plan)
                          for batch in batches}
            out[name] = {**asdict(COMPACT[name]), "rows": HEAD_CHECK_ROWS, **accuracy,
                         "head_alone_p50_ms": timing, "weight_bytes": weight_bytes(heads[0][1])}
    return out


def _agreement(references: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
    """Compact heads' logits against their fp32 heads': the worst head's numbers, and how close
    the flipped rows' fp32 top two were (near-ties flip first)."""
    results = [compare_outputs(ref, out) for ref, out in zip(references, outputs)]
    flipped = np.concatenate([margins(ref)[ref.argmax(1) != out.argmax(1)] for ref, out in zip(references, outputs)])
    all_margins = np.concatenate([margins(ref) for ref in references])
    max_abs = max(r["max_abs"] for r in results)
    return {"tasks": len(results), "max_abs": max_abs,
            "max_abs_over_max_reference": max(r["max_abs_over_max_reference"] for r in results),
            "top1_agreement": min(r["top1_agreement"] for r in results),
            "flipped_rows": int(len(flipped)),
            "flipped_max_fp32_margin": float(flipped.max()) if len(flipped) else None,
            "rows_with_fp32_margin_below_max_abs": float(np.mean(all_margins < max_abs))}


def _head_alone_ms(fp32: Runner, compact: Runner, name: str, features: np.ndarray, plan: TimingPlan) -> dict:
    """p50 ms of the fp32 head and the compact head alone, in one interleaved loop."""
    samples = time_interleaved({"fp32": fp32.timed_call(features), name: compact.timed_call(features)}, plan)
    return {key: float(np.median(value) * 1000) for key, value in samples.items()}
