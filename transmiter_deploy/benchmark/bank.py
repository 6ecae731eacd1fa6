"""The bank sweep behind ``transmiter bench --bank-sweep``: what N task heads cost on one backbone.

One backbone graph and N synthetic folded TransMiter heads (:mod:`.bank_graphs`; C = D = 1024,
K = 100 by default) are composed with :func:`~..deploy.bank.compose_bank` exactly as a bank
export composes them; compact banks are composed from heads whose MLP weights ONNX Runtime's
weight-only quantiser packed (:mod:`.bank_compact`). The backbone alone and the bank of every N
are timed in ONE interleaved loop per runtime and batch (:func:`.timing.time_interleaved`), so
the ratios bank(N) / backbone are fair on a shared machine. Costs come from the graphs: MACs by
:func:`~..deploy.graph_cost.count_macs` (the backbone, one head at the backbone's d and one at
d = 768, every bank), weight bytes as the sum of a graph's initializers.

Runtimes are the registry's graph runtimes (``TIMED_LOADS``: ONNX graphs, and engines compiled
from them), each bank run through the runtime's own runner built from runtime-neutral
:class:`~..runtimes.base.RunSettings`, as the suite's are (:mod:`.runtimes`); a runtime that
cannot run here is skipped with its reason, and one that cannot load a compact bank (an ONNX
Runtime graph: ``com.microsoft`` MatMulNBits) times the fp32 banks only, with the reason
recorded. Before timing, every bank is checked against its parts (:mod:`.bank_checks`).

Results: ``bank.json``, then ``RESULTS.md`` and ``bank_latency.png`` (:mod:`.bank_report`), each
written atomically. Composed banks are written to the work folder only to load them, and
removed once the sweep is done (a 32-task fp32 bank of ViT-B-16 is 1.5 GB).
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import library_versions, utc_now, write_json
from ..deploy.bank import compose_bank
from ..deploy.graph_cost import count_macs
from ..deploy.trace import DEFAULT_OPSET
from ..errors import DependencyError, InputError, VerificationError, one_line
from ..host import cpu_model
from ..runtimes.base import GraphFile, Runner, RunSettings
from ..runtimes.onnx_files import save_graph
from ..runtimes.registry import REFERENCE_PRECISION, RUNTIMES
from ..runtimes.registry import runtime as registered_runtime
from .bank_checks import compact_check, head_accuracy, parts_check
from .bank_compact import COMPACT, compact_heads
from .bank_graphs import BankGraphs, build_graphs, head_graph, weight_bytes
from .bank_report import RATIO_TARGET, RESULTS_JSON
from .report import paired_ratio, slug
from .timing import TimingPlan, summarise, time_interleaved

DEFAULT_TASKS = (1, 2, 4, 8, 16, 32)
DEFAULT_BATCHES = (1, 8)
TIMED_LOADS = ("onnx", "engine")  # the sweep times graphs: ONNX files, or engines compiled from them
REFERENCE_FEATURE_DIM = 768  # the d the MAC target is stated at (ViT-L-14's); ViT-B-16 has 512
STAGING_DIR = "bank-sessions"  # under the work folder: the composed banks (and engines) of one sweep
# Timed in the sweep by default: q8i at N = 8, 16, 32 (the slope and the target's N); q8 (fp32
# arithmetic) at the target's N only, as its CPU kernel is over 10x slower than the fp32 head's
# (see the report). Fewer variants per loop leave more rounds in the same wall time.
DEFAULT_COMPACT = ("q8i@8,16,32", "q8@16")


def parse_tasks(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4): the bank sizes of the sweep."""
    try:
        tasks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--bank-sweep takes task counts separated by commas (e.g. 1,2,4,8,16,32), got {text!r}")
    if not tasks or min(tasks) < 1:
        raise InputError(f"--bank-sweep needs positive task counts, got {text!r}")
    return tuple(sorted(set(tasks)))


def parse_compact(specs: tuple[str, ...], tasks: tuple[int, ...], strict: bool = True) -> dict[str, tuple[int, ...]]:
    """``("q8i", "q8@16")`` -> {compact name: the N it is timed at}; ``none`` times none. A
    setting whose N are not in ``tasks`` is refused, or with ``strict=False`` left out."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec == "none":
            continue
        name, _, at = spec.partition("@")
        if name not in COMPACT:
            raise InputError(f"unknown compact head setting '{name}' (known: {', '.join(COMPACT)}, or none)")
        chosen = tasks if not at else tuple(n for n in parse_tasks(at) if n in tasks)
        if at and not chosen:
            if not strict:
                continue
            raise InputError(f"--bank-compact {spec}: none of {at} is a task count of the sweep {list(tasks)}")
        out[name] = tuple(sorted(set(out.get(name, ())) | set(chosen)))
    return out


@dataclass(frozen=True)
class BankSettings:
    model: str = "ViT-B-16"
    tasks: tuple[int, ...] = DEFAULT_TASKS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    width: int = 1024  # C = D
    classes: int = 100  # K per task
    seed: int = 0
    compact: dict[str, tuple[int, ...]] = field(default_factory=lambda: parse_compact(DEFAULT_COMPACT, DEFAULT_TASKS))
    # per batch: at least min_rounds, then rounds until budget_s is spent (at most max_rounds)
    # (2-core ViT-B-16, 11 variants: ~80 rounds at batch 1 and 20 at batch 8 in about 8 minutes)
    plan: TimingPlan = TimingPlan(warmup=1, min_rounds=20, max_rounds=80, budget_s=160.0)
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if not self.tasks or min(self.tasks) < 1 or not self.batches or min(self.batches) < 1:
            raise InputError(f"the bank sweep needs positive task counts and batches, got {self.tasks}, {self.batches}")
        if self.classes > self.width:
            raise InputError(f"{self.classes} task classes do not fit in a logit width of {self.width}")
        for name, at in self.compact.items():
            if name not in COMPACT or not set(at) <= set(self.tasks):
                raise InputError(f"compact setting {name} at {at}: not a known setting or not a task count of the sweep")


# ---- runtimes -------------------------------------------------------------------------------

def default_runtimes() -> tuple[str, ...]:
    """Every graph runtime of the registry (``TIMED_LOADS``), in registry order: what the sweep
    times by default; those that cannot run here are skipped with their reasons."""
    return tuple(name for name, entry in RUNTIMES.items() if entry.loads in TIMED_LOADS)


def choose_runtimes(names: tuple[str, ...], log: Callable[[str], None]) -> tuple[list[str], list[dict]]:
    """``names`` split into the runtimes to time here and the skipped ones with their reasons;
    DependencyError when none can run."""
    available, skipped = [], []
    for name in names:
        entry = registered_runtime(name)  # an unknown name is refused
        reason = (f"the bank sweep times graphs; {name} runs torch modules" if entry.loads not in TIMED_LOADS
                  else entry.unavailable())
        (skipped.append({"runtime": name, "reason": reason}) if reason else available.append(name))
    for s in skipped:
        log(f"bank sweep: skipping {s['runtime']}: {s['reason']}")
    if not available:
        raise DependencyError(f"no graph runtime to time the bank sweep on here ({', '.join(names) or 'none asked for'})")
    return available, skipped


# ---- the graphs and their costs -------------------------------------------------------------

@dataclass(frozen=True)
class _Variant:
    name: str  # "backbone", "bank16", "bank16@q8i"
    tasks: int  # 0 for the backbone
    weights: str  # "fp32" or a compact setting's name


def _variant_name(tasks: int, weights: str) -> str:
    return "backbone" if tasks == 0 else f"bank{tasks}" + ("" if weights == "fp32" else f"@{weights}")


def sweep_variants(settings: BankSettings) -> list[_Variant]:
    """What one loop times: the backbone alone, the fp32 bank of every N, each compact bank."""
    variants = [_Variant("backbone", 0, "fp32")]
    variants += [_Variant(_variant_name(n, "fp32"), n, "fp32") for n in settings.tasks]
    variants += [_Variant(_variant_name(n, name), n, name) for name, at in settings.compact.items() for n in at]
    return variants


def graph_costs(graphs: BankGraphs, settings: BankSettings, compact: dict[str, list]) -> dict:
    """MACs at batch 1 and weight bytes: backbone, one head at the backbone's d and at d = 768,
    each compact head."""
    head = graphs.heads[0][1]
    reference = head_graph(REFERENCE_FEATURE_DIM, settings.width, settings.classes, settings.seed, settings.opset)
    return {
        "backbone": {"macs": count_macs(graphs.backbone), "weight_bytes": weight_bytes(graphs.backbone)},
        "head": {"feature_dim": graphs.feature_dim, "macs": count_macs(head)["total"], "weight_bytes": weight_bytes(head)},
        "head_reference_d": {"feature_dim": REFERENCE_FEATURE_DIM, "macs": count_macs(reference)["total"],
                             "weight_bytes": weight_bytes(reference)},
        "head_macs_formula": "d*D + d (mean) + 2*4*D*D (MLP) + D*K (pull)",
        "compact_heads": {name: {"weight_bytes": weight_bytes(heads[0][1]),
                                 "weight_bytes_fp32": weight_bytes(head), **asdict(COMPACT[name])}
                          for name, heads in compact.items() if heads},
    }


def compose_variants(variants: list[_Variant], graphs: BankGraphs, compact: dict[str, list], staging: Path,
                     log: Callable[[str], None]) -> tuple[dict[str, Path], dict[str, dict]]:
    """Every variant's graph composed and saved under ``staging`` (its path by name) and each
    bank's costs. All of them before any runner exists: composing (with its full onnx.checker
    pass) a 32-task ViT-B-16 bank peaks at several GB, on top of nothing else."""
    paths, costs = {}, {}
    for variant in variants:
        build = time.perf_counter()
        paths[variant.name] = staging / f"{variant.name}.onnx"
        if variant.tasks == 0:
            save_graph(graphs.backbone, paths[variant.name], probe=False)
            continue
        heads = graphs.heads if variant.weights == "fp32" else compact[variant.weights]
        model = compose_bank(graphs.backbone, heads[: variant.tasks])
        # ONNX shape inference cannot type com.microsoft's MatMulNBits, so graph_cost counts
        # fp32 banks only; a compact bank does the same multiply-accumulates
        macs = count_macs(model)["total"] if variant.weights == "fp32" else None
        costs[variant.name] = {"tasks": variant.tasks, "weights": variant.weights, "macs": macs,
                               "weight_bytes": weight_bytes(model)}
        save_graph(model, paths[variant.name], probe=False)  # work files: external data past 2 GB
        del model
        gc.collect()
        log(f"bank sweep: composed {variant.name} in {time.perf_counter() - build:.1f} s")
    return paths, costs


# ---- timing on one runtime ------------------------------------------------------------------

@dataclass
class _Measured:
    """What the runtimes measured: timing rows, checks, and what a runtime could not run."""

    rows: list[dict] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)


def _ready_runners(runtime: str, variants: list[_Variant], paths: dict[str, Path], run: RunSettings,
                   stack: ExitStack, pixels: np.ndarray, graphs: BankGraphs, measured: _Measured,
                   log: Callable[[str], None]) -> list[tuple[_Variant, Runner]]:
    """Every variant's runner on ``runtime``, active (closed by ``stack``) and checked on
    ``pixels``. A compact bank the runtime cannot load or run is left out with the reason; an
    fp32 bank that fails, or does not match its parts, stops the sweep."""
    entry, ready = registered_runtime(runtime), []
    features, references = None, {}
    for variant in variants:
        runner = entry.create(GraphFile(paths[variant.name], REFERENCE_PRECISION), run)
        try:
            stack.enter_context(runner)
            outputs = runner.infer_outputs(pixels)
        except Exception as exc:  # the runtime's own exception types too (ONNX Runtime's, TensorRT's)
            runner.deactivate()
            if variant.weights == "fp32":
                raise
            reason = one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            measured.skipped.append({"runtime": runtime, "variant": variant.name, "reason": reason})
            log(f"bank sweep {runtime}: not timing {variant.name}: {reason}")
            continue
        ready.append((variant, runner))
        if variant.tasks == 0:
            features = next(iter(outputs.values()))
        elif variant.weights == "fp32":
            references[variant.tasks] = outputs
            measured.checks[f"{runtime}_{variant.name}_vs_parts"] = parts_check(
                outputs, features, graphs, variant.tasks, run.threads)
        elif variant.tasks in references:
            measured.checks[f"{runtime}_{variant.name}_vs_{_variant_name(variant.tasks, 'fp32')}"] = compact_check(
                outputs, references[variant.tasks])
    log(f"bank sweep {runtime}: {len(ready)} runners ready and checked")
    failed = [name for name, c in measured.checks.items() if c.get("required") and not c["passed"]]
    if failed:
        raise VerificationError(f"bank sweep: composed banks do not match their parts ({', '.join(failed)})")
    return ready


def _time_batch(runtime: str, ready: list[tuple[_Variant, Runner]], batch: int, pixels: np.ndarray,
                plan: TimingPlan, log: Callable[[str], None]) -> list[dict]:
    """One interleaved loop of every ready variant at ``batch``: a row each, with its ratios to
    the backbone (of medians, and per round)."""
    calls = {variant.name: runner.timed_call(pixels) for variant, runner in ready}
    loop = time.perf_counter()
    samples = time_interleaved(calls, plan)
    by_name = {variant.name: {"runtime": runtime, "batch": batch, "variant": variant.name, "tasks": variant.tasks,
                              "weights": variant.weights, **summarise(samples[variant.name], batch)}
               for variant, _ in ready}
    backbone = by_name["backbone"]
    for row in by_name.values():
        if row is not backbone:
            row["ratio_vs_backbone"] = row["p50_ms"] / backbone["p50_ms"]
            row["paired_ratio_vs_backbone"] = paired_ratio(row, backbone)
    log(f"bank sweep {runtime} batch {batch} ({len(samples['backbone'])} rounds, "
        f"{time.perf_counter() - loop:.0f} s): p50 ms " + ", ".join(
            f"{r['variant']} {r['p50_ms']:.1f}" for r in by_name.values()))
    return list(by_name.values())


def time_runtimes(settings: BankSettings, runtimes: list[str], variants: list[_Variant], paths: dict[str, Path],
                  graphs: BankGraphs, staging: Path, threads: int, log: Callable[[str], None]) -> _Measured:
    """Each runtime in turn: its runners made, checked and timed at every batch, then freed. The
    runners take turns in this process (``shares_process``); engines are compiled under
    ``staging`` for batches up to the largest."""
    rng = np.random.default_rng(settings.seed)
    pixels = {b: rng.standard_normal((b, 3, *graphs.image_size), dtype=np.float32) for b in settings.batches}
    run = RunSettings(threads=threads, shares_process=True, max_batch=max(settings.batches),
                      compiled_dir=staging / "compiled")
    measured = _Measured()
    for runtime in runtimes:
        with ExitStack() as stack:
            ready = _ready_runners(runtime, variants, paths, run, stack, pixels[max(settings.batches)], graphs,
                                   measured, log)
            for batch in settings.batches:
                measured.rows += _time_batch(runtime, ready, batch, pixels[batch], settings.plan, log)
        gc.collect()
    return measured


# ---- the sweep ------------------------------------------------------------------------------

def run_bank_sweep(settings: BankSettings, out_dir: Path, work_dir: Path, threads: int,
                   runtimes: tuple[str, ...] | None = None, command: str = "",
                   log: Callable[[str], None] = print) -> Path:
    """Build, verify and time the sweep on ``runtimes`` (default: :func:`default_runtimes`);
    writes ``bank.json`` in ``out_dir`` and returns its path."""
    started = time.perf_counter()
    available, skipped = choose_runtimes(default_runtimes() if runtimes is None else tuple(runtimes), log)
    graphs = build_graphs(settings, work_dir, log)
    compact = {name: compact_heads(graphs, COMPACT[name], max(at)) for name, at in settings.compact.items()}
    costs = graph_costs(graphs, settings, compact)
    log(f"bank sweep: backbone {costs['backbone']['macs']['total'] / 1e9:.2f} GMACs, head {costs['head']['macs'] / 1e6:.2f} "
        f"MMACs and {costs['head']['weight_bytes'] / 1e6:.1f} MB at d = {graphs.feature_dim}")
    accuracy = head_accuracy(graphs, compact, threads, settings.batches) if compact else {}
    for name, row in accuracy.items():
        log(f"compact {name}: max abs {row['max_abs']:.3g}, top-1 agreement {row['top1_agreement']:.2%} vs fp32 heads")
    variants = sweep_variants(settings)
    staging = Path(work_dir) / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    try:
        paths, bank_costs = compose_variants(variants, graphs, compact, staging, log)
        measured = time_runtimes(settings, available, variants, paths, graphs, staging, threads, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        gc.collect()
    body = {
        "format": "transmiter-deploy/bank-sweep", "format_version": 1,
        "environment": _environment(threads, command), "seconds": time.perf_counter() - started,
        "peak_rss_mib": _peak_rss_mib(),
        "settings": {**asdict(replace(settings, compact={})), "compact": {k: list(v) for k, v in settings.compact.items()},
                     "feature_dim": graphs.feature_dim, "image_size": list(graphs.image_size), "threads": threads},
        "costs": {**costs, "banks": bank_costs}, "compact_heads": accuracy, "checks": measured.checks,
        "rows": measured.rows, "skipped": skipped + measured.skipped,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_JSON, body)
    return out_dir / RESULTS_JSON


def _peak_rss_mib() -> float | None:
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return None


def _environment(threads: int, command: str) -> dict:
    import onnxruntime as ort

    from .suite import host_label

    return {"date": utc_now(), "host": platform.node(), "host_label": host_label(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime_intra_op_threads": threads, "onnxruntime_providers": ort.get_available_providers(),
            "python": platform.python_version(), "versions": library_versions(), "command": command}


def default_out(model: str) -> Path:
    from .suite import host_label

    return Path("benchmarks") / "results" / (f"{host_label()}-bank" if model == RATIO_TARGET["target"]
                                             else f"{host_label()}-bank-{slug(model)}")
