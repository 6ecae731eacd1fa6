"""Run the benchmark: latency per runtime, MACs per component, the demo accuracy table.

Two profiles. ``quick`` (the default of ``make bench``) fits in 15 minutes on a
2-core CPU machine: batches 1 and 8 on CPU, every pair; ViT-L-14 only at batch 1,
on ONNX Runtime, without the unfolded variant. ``full`` is the long sweep: batches 1, 8, 32, 128 on CPU (up to 256 on a
GPU), every runtime, more rounds. Results go to ``<out>/latency.json``,
``flops.json`` and ``accuracy.json``; :mod:`.report` turns them into RESULTS.md
and plots.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..artifacts import library_versions, utc_now, write_json
from ..errors import DependencyError, InputError
from ..runtimes.registry import precision
from ..host import cpu_model
from .graphs import export_graphs
from .report import slug
from .runtimes import BENCH_RUNTIMES, CPU_RUNTIMES, INCLUDES_COPIES, Caller, unavailable
from .timing import TimingPlan, summarise, time_interleaved
from .variants import PAIRS, VARIANT_NAMES, build_group, targets_of

PARTS = ("latency", "flops", "accuracy")
WEIGHTS_NOTE = ("Latency and MACs use random weights: open_clip architectures built from a seed, a synthetic "
                "C-row head and adapter. Speed does not depend on weight values; accuracy comes only from the "
                "demo world's trained models.")


@dataclass(frozen=True)
class Profile:
    name: str
    pairs: tuple[str, ...]
    cpu_batches: tuple[int, ...]
    gpu_batches: tuple[int, ...]
    plan: TimingPlan
    # Cuts that keep the quick profile within 15 minutes on 2 CPU cores, where one ViT-L-14
    # forward pass at batch 8 takes about 10 s and exporting one ViT-L-14 graph about 90 s:
    skip_runtimes: tuple[tuple[str, str], ...] = field(default=())  # (runtime, target) not timed
    skip_variants: tuple[tuple[str, str], ...] = field(default=())  # (target, variant) not built
    cpu_batches_by_target: dict[str, tuple[int, ...]] = field(default_factory=dict)
    variants: tuple[str, ...] = VARIANT_NAMES  # which are built and timed ("eft" = every EFT variant)
    precisions: tuple[str, ...] = ("fp32",)  # others add backbone@<p> and fused@<p> on graph runtimes

    def batches(self, runtime: str, target: str) -> tuple[int, ...]:
        if runtime not in CPU_RUNTIMES:
            return self.gpu_batches
        return self.cpu_batches_by_target.get(target, self.cpu_batches)


PROFILES = {
    "quick": Profile("quick", tuple(PAIRS), (1, 8), (1, 8, 64),
                     TimingPlan(warmup=1, min_rounds=5, max_rounds=20, budget_s=8.0),
                     skip_runtimes=(("pytorch-cpu", "ViT-L-14"),),
                     skip_variants=(("ViT-L-14", "unfolded"),),
                     cpu_batches_by_target={"ViT-L-14": (1,)}),
    "full": Profile("full", tuple(PAIRS), (1, 8, 32, 128), (1, 8, 32, 64, 128, 256),
                    TimingPlan(warmup=2, min_rounds=10, max_rounds=100, budget_s=60.0)),
}


def host_label() -> str:
    """``cpu-<cores>core`` or ``gpu-<model>``: the results folder name."""
    if torch.cuda.is_available():
        return "gpu-" + slug(torch.cuda.get_device_name(0))
    return f"cpu-{os.cpu_count()}core"


def environment(threads: int, profile: Profile, command: str) -> dict:
    """What every result file records about the machine and the software."""
    import onnxruntime as ort

    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
               "cuda": torch.version.cuda}
    return {
        "date": utc_now(), "host": platform.node(), "host_label": host_label(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "gpu": gpu, "torch_threads": threads, "onnxruntime_intra_op_threads": threads,
        "onnxruntime_providers": ort.get_available_providers(), "python": platform.python_version(),
        "platform": platform.platform(), "versions": library_versions(), "profile": asdict(profile),
        "weights": WEIGHTS_NOTE, "command": command,
    }


def measure_latency(profile: Profile, work_dir: Path, threads: int, runtimes: tuple[str, ...] = BENCH_RUNTIMES,
                    log=print, progress: bool = False) -> tuple[dict, dict]:
    """``(latency, flops)`` result bodies: every variant of every target, per runtime and batch."""
    available, skipped = [], []
    for runtime in runtimes:
        reason = unavailable(runtime)
        if reason is None:
            available.append(runtime)
        else:
            skipped.append({"runtime": runtime, "reason": reason})
            log(f"skipping {runtime}: {reason}")
    rows, flops = [], {}
    for target, pair_names in targets_of(list(profile.pairs)).items():
        start = time.perf_counter()
        group = build_group(target, pair_names, precisions=profile.precisions)
        for skipped_target, variant in profile.skip_variants:
            if skipped_target == target and group.variants.pop(variant, None) is not None:
                skipped.append({"runtime": "all", "target": target, "variant": variant,
                                "reason": f"not built in the {profile.name} profile"})
        for name in list(group.variants):
            if name.split(":")[0].split("@")[0] not in profile.variants:
                del group.variants[name]
        graphs, macs = export_graphs(group, work_dir, progress=progress)
        flops[target] = {
            "pairs": pair_names, "feature_dim": group.feature_dim, "logit_width": group.logit_width,
            "classes": group.classes, "image_size": list(group.image_size),
            "variants": {name: [macs[part.graph_key] for part in variant.parts]
                         for name, variant in group.variants.items()},
        }
        log(f"{target}: models and graphs ready in {time.perf_counter() - start:.0f} s")
        timed = []
        for runtime in available:
            if (runtime, target) in profile.skip_runtimes:
                skipped.append({"runtime": runtime, "target": target, "reason": f"not timed in the {profile.name} profile"})
            else:
                timed.append(runtime)
        rows += _time_runtimes(profile, target, group, graphs, timed, threads, Path(work_dir), log)
        del group
        gc.collect()
    return {"rows": rows, "skipped": skipped}, {"targets": flops}


def _time_runtimes(profile: Profile, target: str, group, graphs: dict[str, Path], runtimes: list[str], threads: int,
                   work_dir: Path, log) -> list[dict]:
    """Rows of every variant on every runtime at each batch. The runtimes that time a batch share
    its loop, as the variants do: a ratio between two runtimes (OpenVINO int8 against ONNX Runtime
    fp32) is then measured under the same machine load, round by round."""
    plans = {runtime: profile.batches(runtime, target) for runtime in runtimes}
    callers = {runtime: Caller(runtime, group, graphs, threads, work_dir, max(plans[runtime])) for runtime in runtimes}
    rows = []
    try:
        for batch in sorted({batch for batches in plans.values() for batch in batches}):
            # The whole-model variants are compared by ratio, so they share one loop. The head
            # alone gets its own: between two backbone calls its weights (33 MB at C = D = 1024)
            # would be evicted from cache, and "alone" means its own cost.
            samples = {}
            for takes in ("pixels", "features"):
                calls = {(runtime, name): caller.call(variant, batch)
                         for runtime, caller in callers.items() if batch in plans[runtime]
                         for name, variant in group.variants.items()
                         if variant.takes == takes and caller.supports(variant)}
                samples.update(time_interleaved(calls, profile.plan) if calls else {})
            for (runtime, name), seconds in samples.items():
                rows.append({"target": target, "runtime": runtime, "batch": batch, "variant": name,
                             "input": group.variants[name].takes, "includes_copies": runtime in INCLUDES_COPIES,
                             **summarise(seconds, batch)})
            for runtime in dict.fromkeys(runtime for runtime, _ in samples):
                medians = ", ".join(f"{row['variant']} {row['p50_ms']:.2f}" for row in rows[-len(samples):]
                                    if row["runtime"] == runtime)
                log(f"{target} {runtime} batch {batch}: p50 ms {medians}")
    finally:
        for caller in callers.values():
            caller.release()
    return rows


def measure_accuracy(work_dir: Path, log=print, progress: bool = False) -> dict:
    """The demo world's table (test split) with the EFT row, from the shipped weights."""
    from ..demo.experiment import ExperimentSettings, run_task
    from ..demo.tasks import TASKS
    from ..demo.weights import shipped_weights_dir, verify_weights

    weights = shipped_weights_dir()
    verify_weights(weights)
    settings = ExperimentSettings()
    rows = []
    for task in TASKS.values():
        start = time.perf_counter()
        # rendered images and caches persist in the work directory: a re-run only re-trains adapters
        rows += run_task(task, weights, Path(work_dir) / "accuracy" / task.name, settings, progress=progress)
        log(f"accuracy {task.name}: {time.perf_counter() - start:.0f} s")
    return {"rows": rows, "settings": asdict(settings), "weights": "shipped demo weights (transmiter_deploy/demo/weights)"}


def run_benchmark(profile_name: str, out_dir: Path, work_dir: Path, threads: int, parts: tuple[str, ...] = PARTS,
                  runtimes: tuple[str, ...] = BENCH_RUNTIMES, pairs: tuple[str, ...] | None = None,
                  batches: tuple[int, ...] | None = None, variants: tuple[str, ...] | None = None,
                  rounds: int | None = None, command: str = "", log=print,
                  progress: bool = False, precisions: tuple[str, ...] = ("fp32",)) -> dict[str, Path]:
    """Measure the named parts and write their JSON files into ``out_dir``; returns what was written.
    ``pairs`` narrows the profile's pairs (all of them by default); ``batches`` replaces its batch
    sizes on every runtime and target; ``variants`` keeps only those variants (``eft`` = every
    EFT variant); ``rounds`` fixes the number of timing rounds (no time budget)."""
    if profile_name not in PROFILES:
        raise InputError(f"unknown benchmark profile '{profile_name}' (known: {', '.join(PROFILES)})")
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(runtimes) - set(BENCH_RUNTIMES))
    if unknown:
        raise InputError(f"unknown benchmark part or runtime: {', '.join(unknown)}")
    if threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    profile = PROFILES[profile_name]
    if pairs is not None:
        targets_of(list(pairs))  # names checked before anything runs
        profile = replace(profile, pairs=tuple(pairs))
    if batches is not None:
        if not batches or min(batches) < 1:
            raise InputError(f"batch sizes must be positive, got {list(batches)}")
        profile = replace(profile, cpu_batches=tuple(batches), gpu_batches=tuple(batches), cpu_batches_by_target={})
    if variants is not None:
        unknown = sorted(set(variants) - set(VARIANT_NAMES))
        if unknown or not variants:
            raise InputError(f"unknown variant {', '.join(unknown)} (known: {', '.join(VARIANT_NAMES)})")
        profile = replace(profile, variants=tuple(variants))
    for name in precisions:
        missing = precision(name).missing()  # an unknown name is refused here too
        if missing is not None:
            raise DependencyError(f"benchmarking {name} needs its converter: {missing}")
    profile = replace(profile, precisions=tuple(dict.fromkeys(("fp32", *precisions))))
    if rounds is not None:
        if rounds < 1:
            raise InputError(f"rounds must be at least 1, got {rounds}")
        profile = replace(profile, plan=replace(profile.plan, min_rounds=rounds, max_rounds=rounds))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure_parts(profile, out_dir, work_dir, threads, parts, runtimes, command, log, progress)
    finally:
        torch.set_num_threads(previous)  # a library call leaves the caller's thread count as it was


def _measure_parts(profile: Profile, out_dir: Path, work_dir: Path, threads: int, parts: tuple[str, ...],
                   runtimes: tuple[str, ...], command: str, log, progress: bool) -> dict[str, Path]:
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if "latency" in parts or "flops" in parts:
        start = time.perf_counter()
        latency, flops = measure_latency(profile, work_dir, threads, runtimes if "latency" in parts else (),
                                         log, progress)
        seconds = time.perf_counter() - start
        env = environment(threads, profile, command)
        if "latency" in parts:
            written["latency"] = out_dir / "latency.json"
            write_json(written["latency"], {"environment": env, "seconds": seconds, **latency})
        if "flops" in parts:
            written["flops"] = out_dir / "flops.json"
            write_json(written["flops"], {"environment": env, **flops})
    if "accuracy" in parts:
        start = time.perf_counter()
        accuracy = measure_accuracy(work_dir, log, progress)
        written["accuracy"] = out_dir / "accuracy.json"
        write_json(written["accuracy"], {"environment": environment(threads, profile, command),
                                         "seconds": time.perf_counter() - start, **accuracy})
    return written
