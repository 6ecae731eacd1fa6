"""The biggest open CLIPs through `export-onnx`'s code path: export time, peak memory, parity, MACs.

For each open_clip architecture (random weights: shapes, cost and memory do not depend on the
values), the image tower alone (``load_image_tower``: the heads are computed before, once), a
synthetic zero-shot head (C = 1024 rows) and a transferred adapter (D = 1024, MLP ratio 4, K = 100)
are exported by ``export_deployment`` (fp32 and mixed fp16, parity against PyTorch on the parity
images), in a child process per model so each peak RSS is that model's alone. Then the fp16
conversion runs again alone, in a fresh process, from the exported ``model.onnx``: the peak of the
converter itself against the fp32 graph's size (issue 17's target: <= 3x).

    python benchmarks/large_models.py --model ViT-B-16 --model ViT-L-14 --model ViT-H-14 --model ViT-bigG-14

writes ``benchmarks/results/cpu-2core/large_models.{json,md}`` (``--results DIR`` elsewhere); runs that fail (out of memory, a
failed check) are recorded with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-2core"
PHASE_FILE = "LARGE_MODELS_PHASE_FILE"


class PeakMemory:
    """Peak RSS of this process, sampled every 20 ms, attributed to the phase running at the time."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self.rss()
            if value > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = value
            time.sleep(0.02)

    def enter(self, phase: str) -> None:
        self.phase = phase
        if PHASE_FILE in os.environ:  # the parent names the phase a killed child died in
            Path(os.environ[PHASE_FILE]).write_text(phase)

    def report(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "children_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                "phase_peak_rss_bytes": self.peaks}


def _mark_phases(memory: PeakMemory) -> None:
    """Attribute the export's peaks to the library calls that make them: each wrapped call names
    the phase until the next one starts."""
    import onnx
    import onnxslim
    import torch

    from transmiter_deploy.deploy import onnx_export, precision_edits, trace
    from transmiter_deploy.deploy.precisions import fp16
    from transmiter_deploy.runtimes import onnxruntime

    def marked(owner, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)

        def call(*args, **kwargs):
            memory.enter(phase)
            return original(*args, **kwargs)

        setattr(owner, attribute, call)

    marked(torch.onnx, "export", "torch.onnx.export")
    marked(onnx, "load", "onnx.load")
    marked(onnxslim, "slim", "onnxslim.slim")
    marked(trace, "check_full", "onnx.checker")
    for module in (trace, onnx_export, precision_edits):
        marked(module, "save_graph", "save_graph")
    marked(onnxruntime, "ort_session", "ONNX Runtime parity")
    marked(fp16, "out_of_range_nodes", "fp16 range pass")
    marked(fp16, "write_external_tensors", "fp16 weights to file")


def _graph_bytes(directory: Path, stem: str) -> int:
    return sum(path.stat().st_size for path in directory.glob(f"{stem}.onnx*"))


def child_export(name: str, out: Path, samples: int, precisions: tuple[str, ...]) -> dict:
    memory = PeakMemory()
    import torch

    from transmiter_deploy.benchmark.variants import synthetic_head_and_adapter
    from transmiter_deploy.deploy.onnx_export import ExportSettings, export_deployment, parity_pixels
    from transmiter_deploy.features.models import ModelSpec, load_image_tower

    torch.set_num_threads(os.cpu_count() or 1)
    memory.enter("load image tower")
    start = time.perf_counter()
    model = load_image_tower(ModelSpec(name, init_seed=0))
    load_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.model.visual.parameters())
    if PHASE_FILE in os.environ:  # recorded for a run that is killed before it reports
        Path(os.environ[PHASE_FILE] + ".parameters").write_text(str(parameters))
    from transmiter_deploy.deploy.export_memory import estimate

    from transmiter_deploy.runtimes.onnx_files import resolve_external_data_threshold

    predicted = estimate(parameters * 4, precisions, external_data=parameters * 4 > resolve_external_data_threshold())
    head, artifact = synthetic_head_and_adapter(model, 1024, 100)
    pixels = parity_pixels(model, None, samples)

    def log(line: str) -> None:
        print(f"  [{name}] {line}", file=sys.stderr, flush=True)

    _mark_phases(memory)
    start = time.perf_counter()
    report = export_deployment(model, head, artifact, out, pixels, ExportSettings(precisions=precisions), log=log)
    export_s = time.perf_counter() - start
    return {"image_tower_parameters": parameters, "load_s": load_s, "export_s": export_s,
            "estimated_peak_bytes": predicted.peak_bytes,
            "timings": report.timings, "macs": report.macs, "checks": report.parity["checks"],
            "graph_bytes": {stem: _graph_bytes(out, stem) for stem in ("model", "model_fp16", "head", "head_fp16")
                            if (out / f"{stem}.onnx").exists()},
            "external_data": sorted(path.name for path in out.glob("*.onnx.data")),
            **memory.report()}


def child_fp16(out: Path, samples: int) -> dict:
    """The fp16 conversion of ``out/model.onnx`` alone (into a scratch directory beside it)."""
    memory = PeakMemory()
    import numpy as np

    from transmiter_deploy.deploy.precision_edits import convert_graph
    from transmiter_deploy.runtimes.registry import PRECISIONS

    scratch = out.parent / f"{out.name}-fp16-alone"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for path in out.glob("model.onnx*"):
        os.link(path, scratch / path.name)
    rng = np.random.default_rng(0)
    with open(out / "manifest.json", encoding="utf-8") as handle:
        size = json.load(handle)["preprocess"]["image_size"]
    pixels = rng.standard_normal((1, 3, *size)).astype(np.float32)
    memory.enter("fp16 conversion")
    start = time.perf_counter()
    convert_graph(scratch, "model", PRECISIONS["fp16"], {"pixel_values": pixels})
    seconds = time.perf_counter() - start
    result = {"convert_s": seconds, **memory.report()}
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _run_child(args: list[str], timeout: float) -> dict:
    """One measurement in a child process; the export's own memory check is off there (the
    estimate is recorded beside the measured peak instead), so a run the machine cannot hold is
    measured to where it stops."""
    command = [sys.executable, __file__, "--child", *args]
    with tempfile.NamedTemporaryFile("r", prefix="large-models-phase-") as phase:
        env = {**os.environ, "TRANSMITER_MEMORY_CHECK": "off", PHASE_FILE: phase.name}
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, timeout=timeout, text=True, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        last = Path(phase.name).read_text() or "start"
        counted = Path(phase.name + ".parameters")
        parameters = int(counted.read_text()) if counted.exists() else None
        counted.unlink(missing_ok=True)
    if done.returncode != 0:
        reason = ("killed by SIGKILL (out of memory)" if done.returncode == -9 else f"exit status {done.returncode}")
        return {"error": f"{reason} during {last}", **({"image_tower_parameters": parameters} if parameters else {})}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _estimates(results: dict, precisions: str) -> None:
    """Every run's estimate as the export's memory check makes it now (runs kept from earlier
    invocations were estimated by the factors of their day)."""
    from transmiter_deploy.deploy.export_memory import estimate
    from transmiter_deploy.runtimes.onnx_files import resolve_external_data_threshold

    for name, result in results.items():
        export = result.get("export", {}) if not name.startswith("_") else {}
        if "image_tower_parameters" in export:
            weight_bytes = export["image_tower_parameters"] * 4
            export["estimated_peak_bytes"] = estimate(weight_bytes, precisions.split(","), external_data=(
                weight_bytes > resolve_external_data_threshold())).peak_bytes


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def markdown(results: dict, facts: dict) -> str:
    lines = [f"# Large CLIP image towers through export-onnx ({facts['host']})", "",
             f"Random weights; image tower alone; C = D = 1024, K = 100; parity on {facts['samples']} images. "
             f"Machine: {facts['cpus']} CPUs, {facts['memory_gb']:.1f} GB RAM; torch {facts['versions'].get('torch')}, "
             f"onnx {facts['versions'].get('onnx')}, onnxruntime {facts['versions'].get('onnxruntime-gpu')}, "
             f"onnxconverter-common {facts['versions'].get('onnxconverter-common')}.", "",
             "Commands (each row is from the last run of its model):", "",
             *[f"- `{command}`" for command in dict.fromkeys(
                 result.get("command", facts["command"]) for result in results.values())], "",
             "| model | image tower params | fp32 graph GB | fp16 graph GB | export s (fp32 + fp16 + checks) | "
             "export peak RSS GB (estimate before it) | fp16 conversion alone: peak RSS GB (x fp32 graph), s | fp32 parity max abs, top-1 | "
             "fp16 top-1 vs fp32 | backbone GMACs | head+adapter MMACs | overhead % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        export, alone = result.get("export", {}), result.get("fp16_alone", {})
        if "error" in export:
            parameters = export.get("image_tower_parameters")
            lines.append(f"| {name} | {f'{parameters / 1e6:.0f} M' if parameters else '-'} | - | - | - | "
                         f"- (estimated {_gb(export.get('estimated_peak_bytes'))}) | - | - | - | - | - | "
                         f"export failed: {export['error']} |")
            continue
        graphs, macs, checks = export["graph_bytes"], export["macs"], export["checks"]
        fp32 = checks.get("onnx_fp32_vs_torch", {})
        fp16 = checks.get("onnx_fp16_vs_torch_fp32", {})
        if "error" in alone:
            conversion = f"failed: {alone['error']}"
        elif alone:
            conversion = (f"{_gb(alone['peak_rss_bytes'])} ({alone['peak_rss_bytes'] / graphs['model']:.2f}x), "
                          f"{alone['convert_s']:.0f}")
        else:
            conversion = "-"
        lines.append(
            f"| {name} | {export['image_tower_parameters'] / 1e6:.0f} M | {_gb(graphs.get('model'))} | "
            f"{_gb(graphs.get('model_fp16'))} | {export['export_s']:.0f} | {_gb(export['peak_rss_bytes'])} "
            f"(estimated {_gb(export.get('estimated_peak_bytes'))}) | {conversion} | "
            f"{fp32.get('max_abs', float('nan')):.2e}, {fp32.get('top1_agreement', float('nan')):.0%} | "
            f"{format(fp16['top1_agreement'], '.0%') if 'top1_agreement' in fp16 else '-'} | "
            f"{macs['model'].get('backbone', 0) / 1e9:.1f} | "
            f"{macs['model'].get('head+adapter', 0) / 1e6:.2f} | {macs['overhead_percent']:.4f} |")
    lines += ["", "Peak RSS by phase of the export (GB):", ""]
    for name, result in results.items():
        phases = result.get("export", {}).get("phase_peak_rss_bytes", {})
        if phases:
            lines.append(f"- {name}: " + ", ".join(f"{phase} {_gb(value)}" for phase, value in phases.items()))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="open_clip architecture (repeatable)")
    parser.add_argument("--samples", type=int, default=2, help="parity images")
    parser.add_argument("--precision", action="append", default=None, help="default: fp32 and fp16")
    parser.add_argument("--work", type=Path, help="where the exports are written (default: a temporary directory)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # the child is what the kernel kills first if memory runs out (not the shell or other work)
        Path("/proc/self/oom_score_adj").write_text("1000")
        kind, *rest = args.child
        if kind == "export":
            name, out, samples, precisions = rest
            result = child_export(name, Path(out), int(samples), tuple(precisions.split(",")))
        else:
            result = child_fp16(Path(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return 0
    if not args.model:
        parser.error("give at least one --model")
    from transmiter_deploy.artifacts import library_versions

    precisions = ",".join(args.precision or ["fp32", "fp16"])
    work = args.work or Path(tempfile.mkdtemp(prefix="large-models-"))
    results_path = args.results / "large_models.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.model:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {name}: export ({precisions})", file=sys.stderr, flush=True)
        export = _run_child(["export", name, str(out), str(args.samples), precisions], args.timeout)
        result = {"export": export}
        if "error" not in export and "fp16" in precisions:
            print(f"== {name}: fp16 conversion alone", file=sys.stderr, flush=True)
            result["fp16_alone"] = _run_child(["fp16", str(out), str(args.samples)], args.timeout)
        command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        result["command"] = command
        # a run of other precisions than fp32 + fp16 is kept beside that one, not in its place
        results[name if precisions == "fp32,fp16" else f"{name} [{precisions}]"] = result
        shutil.rmtree(out, ignore_errors=True)
        from transmiter_deploy.host import cpu_model

        facts = {"host": cpu_model(), "cpus": os.cpu_count(),
                 "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                 "samples": args.samples, "versions": library_versions(), "command": command}
        _estimates(results, precisions)
        args.results.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({**results, "_facts": facts}, indent=2))
        (args.results / "large_models.md").write_text(
            markdown({key: value for key, value in results.items() if not key.startswith("_")}, facts))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
