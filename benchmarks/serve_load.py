"""Load test of served exports: a bounded load generator on tritonclient against a live
``tritonserver`` (the Python backend: the only one the packaged server has), beside the same
graphs run in-process through :class:`Deployment` at the same batch size.

Every request is one image of preprocessed pixels (batch 1) sent to a model that takes pixels,
so a served figure and an in-process figure time the same graph. Each setting (model, protocol,
concurrency) runs until its duration or its request count is reached, whichever comes first;
each client thread has its own client, and every client is closed (an open one holds the
server's stop for its exit timeout). Triton's own statistics (the model statistics endpoint) are
read before and after each setting: queue and compute time per request, and executions vs
inferences, whose ratio is the mean batch the dynamic batcher executed.

    .venv/bin/python benchmarks/serve_load.py --demo DEMO_EXPORT --bank BANK_EXPORT \\
        --duration 10 --out benchmarks/results/serve_load
    .venv/bin/python benchmarks/serve_load.py --large VIT_B_16_EXPORT --duration 20 \\
        --out benchmarks/results/serve_load_vit-b-16

The large export (a random-weight ViT-B-16 target: compute dominates) is served and timed
in-process at concurrency 1, batch 1: served / in-process is its figure.

Client and server share the machine's cores: at concurrency > 1 the client threads take CPU
time from the model they measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPOSITORIES = (("demo", "demo", "fused"), ("bank", "bankf", "fused"), ("bank", "bank", "ensemble"),
                ("large", "large", "fused"))


@dataclass(frozen=True)
class Setting:
    label: str  # what is served: demo fused, bank fused, bank ensemble, backbone only
    model: str
    export: str  # "demo" or "bank"
    protocol: str
    concurrency: int


def settings(levels: list[int], protocols: list[str], exports: set[str]) -> list[Setting]:
    """Every served model at every concurrency: both protocols at concurrency 1 (the overhead
    figures), the first protocol above it; the large export (compute-dominated) at concurrency 1
    only, where served / in-process is its figure."""
    models = (("demo fused", "demo", "demo"), ("bank fused", "bankf", "bank"),
              ("bank ensemble", "bank", "bank"), ("backbone only", "bank_backbone", "bank"))
    models += (("large fused", "large", "large"),)
    chosen = []
    for label, model, export in (m for m in models if m[2] in exports):
        for level in ([1] if export == "large" else levels):
            for protocol in (protocols if level == 1 else protocols[:1]):
                chosen.append(Setting(label, model, export, protocol, level))
    return chosen


def client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def make_client(module, url: str):
    if module.__name__.endswith("http"):
        return module.InferenceServerClient(url, connection_timeout=120, network_timeout=120)
    return module.InferenceServerClient(url)


def worker(setting: Setting, url: str, pixels: np.ndarray, budget: dict, lock: threading.Lock,
           latencies: list[float], errors: list[str]) -> None:
    """One client thread: requests one after another until the shared budget is spent."""
    module = client_module(setting.protocol)
    client = make_client(module, url)
    try:
        tensor = module.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        while True:
            with lock:
                if budget["left"] <= 0 or time.perf_counter() >= budget["deadline"]:
                    return
                budget["left"] -= 1
            began = time.perf_counter()
            try:
                client.infer(setting.model, [tensor])
            except Exception as exc:  # noqa: BLE001 - an error is a result of the load test
                with lock:
                    errors.append(str(exc).splitlines()[0][:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
    finally:
        client.close()


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    values = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p90_ms": round(float(np.percentile(values, 90)), 3),
            "p99_ms": round(float(np.percentile(values, 99)), 3), "mean_ms": round(float(values.mean()), 3)}


def server_statistics(url: str) -> dict[str, dict]:
    """Triton's statistics of every loaded model, by name (HTTP's JSON form)."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        return {entry["name"]: entry for entry in client.get_inference_statistics("")["model_stats"]}


def statistics_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model that ran during the setting: requests, executions, the mean executed batch, and the
    mean queue and compute times per request (Triton's cumulative counters, differenced)."""
    models = {}
    for name, now in after.items():
        then = before.get(name, {})
        inferences = now.get("inference_count", 0) - then.get("inference_count", 0)
        executions = now.get("execution_count", 0) - then.get("execution_count", 0)
        if inferences <= 0:
            continue
        entry = {"inference_count": inferences, "execution_count": executions,
                 "mean_batch": round(inferences / executions, 3) if executions else None}
        for part in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            new = now.get("inference_stats", {}).get(part, {})
            old = then.get("inference_stats", {}).get(part, {})
            count = new.get("count", 0) - old.get("count", 0)
            nanoseconds = new.get("ns", 0) - old.get("ns", 0)
            entry[f"{part}_count"] = count
            if part != "fail":
                entry[f"{part}_ms_per_request"] = round(nanoseconds / count / 1e6, 3) if count else None
        models[name] = entry
    return models


def run_setting(setting: Setting, server, pixels: np.ndarray, duration: float, max_requests: int) -> dict:
    """One setting: a warm-up (not counted), then the bounded load; latency, throughput, errors and
    the server's statistics over the counted part."""
    url = server.http_url if setting.protocol == "http" else server.grpc_url
    warm = {"left": 2 * setting.concurrency, "deadline": time.perf_counter() + 30}
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(setting, url, pixels, warm, lock, [], []))
               for _ in range(setting.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    before = server_statistics(server.http_url)
    budget = {"left": max_requests, "deadline": time.perf_counter() + duration}
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=worker, args=(setting, url, pixels, budget, lock, latencies, errors))
               for _ in range(setting.concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    stats = statistics_delta(before, server_statistics(server.http_url))
    return {"label": setting.label, "model": setting.model, "export": setting.export,
            "protocol": setting.protocol, "concurrency": setting.concurrency, "batch": len(pixels),
            "requests": len(latencies), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "seconds": round(elapsed, 2), "throughput_per_s": round(len(latencies) / elapsed, 2),
            **percentiles(latencies), "server": stats}


def time_in_process(infer, pixels: np.ndarray, duration: float, max_requests: int) -> dict:
    """``infer(pixels)`` one call after another, bounded as the served settings are."""
    for _ in range(3):
        infer(pixels)
    latencies = []
    began = time.perf_counter()
    while len(latencies) < max_requests and time.perf_counter() - began < duration:
        start = time.perf_counter()
        infer(pixels)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - began
    return {"batch": len(pixels), "calls": len(latencies), "seconds": round(elapsed, 2),
            "images_per_s": round(len(latencies) * len(pixels) / elapsed, 2), **percentiles(latencies)}


def in_process(exports: dict[str, Path], pixels: dict[str, np.ndarray], duration: float, max_requests: int,
               batches: list[int]) -> dict[str, list[dict]]:
    """The served graphs in this process (server idle): the fused graphs through
    ``Deployment.infer`` on ONNX Runtime, and the bank's backbone graph through the registry's
    runner, as the ensemble's backbone model runs it."""
    from transmiter_deploy.runtimes.base import GraphFile, RunSettings
    from transmiter_deploy.runtimes.registry import runtime
    from transmiter_deploy.serving.deployment import Deployment

    results: dict[str, list[dict]] = {}
    for label, export in (("demo fused", "demo"), ("bank fused", "bank"), ("large fused", "large")):
        if export not in exports:
            continue
        with Deployment.open(exports[export], "onnxruntime-cpu") as deployment:
            results[label] = [time_in_process(deployment.infer, np.repeat(pixels[export], batch, axis=0),
                                              duration, max_requests) for batch in (batches if export != "large" else [1])]
            if export == "bank":
                info, precision = deployment.info, deployment.precision
    if "bank" not in exports:
        return results
    graph = GraphFile(info.directory / info.backbone_graph(precision), precision)
    runner = runtime("onnxruntime-cpu").create(graph, RunSettings()).activate()
    try:
        results["backbone only"] = [time_in_process(runner.infer_outputs, np.repeat(pixels["bank"], batch, axis=0),
                                                    duration, max_requests) for batch in batches]
    finally:
        runner.deactivate()
    return results


def make_pixels(export: Path) -> np.ndarray:
    """One drawn image, preprocessed by the export's own transform: (1, 3, H, W) float32."""
    from transmiter_deploy.serving.deployment import Deployment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    with Deployment.open(export, "onnxruntime-cpu") as deployment:
        return deployment.preprocess([image])


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": {name: installed(name) for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "tritonclient",
                                                            "nvidia-pytriton", "transmiter-deploy")
                         if installed(name)},
            "tritonserver": "2.51 (nvidia-pytriton's), Python backend"}


def find(rows: list[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def targets(served: list[dict], local: dict[str, list[dict]], top: int) -> list[dict]:
    """The issue's targets, each met / missed / not measured with the figure."""
    checks = []
    bank = find(served, label="bank fused", concurrency=top)
    backbone = find(served, label="backbone only", concurrency=top)
    if bank and backbone and backbone["throughput_per_s"]:
        ratio = bank["throughput_per_s"] / backbone["throughput_per_s"]
        checks.append(target(f"served bank (fused) / served backbone-only throughput at concurrency {top} >= 0.95",
                             ratio, ratio >= 0.95,
                             f"{bank['throughput_per_s']} / {backbone['throughput_per_s']} req/s; the two served "
                             "models run different Python-backend code (a Deployment; the registry's runner), so a "
                             "ratio above 1 shows no measurable cost of the heads, not a bank faster than its "
                             "backbone"))
    else:
        checks.append(target("bank / backbone-only throughput ratio >= 0.95", None, None, "not measured"))
    for label in ("demo fused", "bank fused"):
        row = find(served, label=label, concurrency=top)
        batch = (row or {}).get("server", {}).get(row["model"] if row else "", {}).get("mean_batch")
        checks.append(target(f"{label}: mean executed batch at concurrency {top} > 2", batch,
                             None if batch is None else batch > 2, "Triton's inference_count / execution_count"))
    base = local.get("demo fused", [{}])[0]
    for protocol in ("http", "grpc"):
        row = find(served, label="demo fused", concurrency=1, protocol=protocol)
        if row is None or base.get("p50_ms") is None or row["p50_ms"] is None:
            checks.append(target(f"demo: served - in-process p50 at concurrency 1, batch 1 ({protocol}) <= 3 ms",
                                 None, None, "not measured"))
            continue
        gap = row["p50_ms"] - base["p50_ms"]
        checks.append(target(f"demo: served - in-process p50 at concurrency 1, batch 1 ({protocol}) <= 3 ms", gap,
                             gap <= 3.0, f"{row['p50_ms']} - {base['p50_ms']} ms"))
    large = local.get("large fused", [{}])[0]
    for protocol in ("http", "grpc"):
        row = find(served, label="large fused", concurrency=1, protocol=protocol)
        name = f"large export: served / in-process p50 at concurrency 1, batch 1 ({protocol}) <= 1.05"
        if row is None or large.get("p50_ms") is None or row["p50_ms"] is None:
            checks.append(target(name, None, None, "not measured: no --large export in this run"))
            continue
        ratio = row["p50_ms"] / large["p50_ms"]
        own = row["server"].get("large", {})
        checks.append(target(name, ratio, ratio <= 1.05,
                             f"{row['p50_ms']} / {large['p50_ms']} ms; the server's compute "
                             f"{own.get('compute_infer_ms_per_request')} ms and queue "
                             f"{own.get('queue_ms_per_request')} ms per request"))
    return checks


def target(name: str, value, met, detail: str) -> dict:
    """A target's row; ``export``: which of the run's exports it is about (its name's first word)."""
    status = "not measured" if met is None else ("met" if met else "missed")
    export = next(word for word in ("demo", "bank", "large") if word in name.split(":")[0].split())
    return {"target": name, "value": None if value is None else round(float(value), 3), "status": status,
            "detail": detail, "export": export}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def served_table(rows: list[dict]) -> list[str]:
    lines = ["| served | model | protocol | conc. | requests | errors | req/s | p50 ms | p90 ms | p99 ms "
             "| mean batch | queue ms | compute ms |", "| --- " * 13 + "|"]
    for row in rows:
        own = row["server"].get(row["model"], {})
        batch_model = own if row["label"] != "bank ensemble" else row["server"].get("bank_backbone", {})
        lines.append(f"| {row['label']} | `{row['model']}` | {row['protocol']} | {row['concurrency']} | "
                     f"{row['requests']} | {row['errors']} | {row['throughput_per_s']} | {row['p50_ms']} | "
                     f"{row['p90_ms']} | {row['p99_ms']} | {batch_model.get('mean_batch')} | "
                     f"{batch_model.get('queue_ms_per_request')} | {batch_model.get('compute_infer_ms_per_request')} |")
    return lines


def markdown(report: dict) -> str:
    lines = ["# Serving load test (`benchmarks/serve_load.py`)", "",
             f"Command: `{report['command']}`", "",
             f"Environment: {report['environment']['cpu']}, {report['environment']['cores']} cores, "
             f"Python {report['environment']['python']}, {report['environment']['tritonserver']}; "
             f"{report['environment']['date']}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in report["environment"]["versions"].items()) + ".", "",
             f"Settings: batch 1 pixels per request, {report['duration_s']} s or {report['max_requests']} requests "
             "per setting (whichever first), after a warm-up of 2 requests per client thread. Client threads and "
             "the server share the cores. Mean batch, queue and compute are Triton's statistics of the model "
             "(for the ensemble: its backbone model), per request.", "", "## Targets", "",
             "| target | status | value | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['status']} | {t['value']} | {t['detail']} |" for t in report["targets"]]
    lines += ["", "## Served", "", *served_table(report["served"]), "", "## In-process (server idle)", "",
              "| graph | batch | calls | images/s | p50 ms | p90 ms | p99 ms |", "| --- " * 7 + "|"]
    for label, rows in report["in_process"].items():
        lines += [f"| {label} | {r['batch']} | {r['calls']} | {r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | "
                  f"{r['p99_ms']} |" for r in rows]
    lines += ["", "The ensemble rows' server statistics per model are in `serve_load.json` (`server`)."]
    return "\n".join(lines) + "\n"


def serve(exports: dict[str, Path], work: Path):
    """The three Python-backend repositories written and served by one tritonserver."""
    from transmiter_deploy.serving.triton import write_repository
    from transmiter_deploy.serving.triton_server import TritonServer

    repositories = []
    for export, name, layout in REPOSITORIES:
        if export not in exports:
            continue
        repositories.append(work / f"repo-{name}")
        write_repository(exports[export], repositories[-1], name=name, layout=layout)
    return TritonServer(repositories, work / "server", explicit=True, models=["*"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None, help="a single-task export (its directory or --out)")
    parser.add_argument("--bank", type=Path, default=None, help="a task bank export (its directory or --out)")
    parser.add_argument("--large", type=Path, default=None,
                        help="a compute-dominated single-task export (e.g. a random-weight ViT-B-16 target), served "
                             "and timed in-process at concurrency 1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load"))
    parser.add_argument("--work", type=Path, default=None, help="repositories and server files (default: a temp dir)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per setting at most")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per setting at most")
    parser.add_argument("--concurrency", type=int, action="append", default=None, help="repeatable; default 1, 4, 8")
    parser.add_argument("--protocol", action="append", choices=("grpc", "http"), default=None,
                        help="repeatable; the first is used above concurrency 1 (default grpc, http)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    levels, protocols = args.concurrency or [1, 4, 8], args.protocol or ["grpc", "http"]
    exports = {name: path.resolve() for name, path in (("demo", args.demo), ("bank", args.bank), ("large", args.large))
               if path is not None}
    if not exports:
        raise SystemExit("serve_load.py: give at least one of --demo, --bank, --large")
    pixels = {name: make_pixels(path) for name, path in exports.items()}
    local = in_process(exports, pixels, args.duration, args.max_requests, sorted({1, max(levels)}))
    served = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        with serve(exports, work) as server:
            for setting in settings(levels, protocols, set(exports)):
                served.append(run_setting(setting, server, pixels[setting.export], args.duration, args.max_requests))
                row = served[-1]
                print(f"{row['label']:14} {row['protocol']:4} c={row['concurrency']}: {row['throughput_per_s']} req/s, "
                      f"p50 {row['p50_ms']} ms, errors {row['errors']}", flush=True)
    report = {"command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
              "environment": environment(), "duration_s": args.duration, "max_requests": args.max_requests,
              "concurrency": levels, "protocols": protocols, "served": served, "in_process": local,
              # a target about an export this run did not serve is left out, not reported as missed
              "targets": [check for check in targets(served, local, max(levels)) if check.pop("export") in exports]}
    write_atomic(args.out / "serve_load.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "RESULTS.md", markdown(report))
    for check in report["targets"]:
        print(f"{check['status']:12} {check['target']}: {check['value']} ({check['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
