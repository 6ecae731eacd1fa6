"""Throughput of the feature cache: the Ray engine against the local engine, same model, same images.

Both engines write the same cache (tests/test_distributed_cache.py checks it); this measures
images per second on this machine. The local engine is `build_cache` in one process (decoding in
the loop, torch on every core); the Ray engine is `build_cache_ray` on a local cluster of all the
machine's CPUs, with its defaults (one encoding actor per CPU, one torch thread each, decoding in
Ray tasks). Each engine's figure is the wall time of one whole build call: for Ray that includes
starting the actors and loading a model in each (the cluster itself is started before, and its
start time is reported apart). The images are drawn here (noisy JPEGs), the model has random
weights (speed does not depend on their values).

    python benchmarks/ray_cache.py [--model ViT-B-32] [--images 256] [--rounds 3] \\
        [--out benchmarks/results/cpu-2core]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmiter_deploy.artifacts import library_versions, utc_now  # noqa: E402
from transmiter_deploy.features.cache import build_cache, load_cache  # noqa: E402
from transmiter_deploy.features.datasets import open_dataset  # noqa: E402
from transmiter_deploy.features.distributed_cache import RayCacheSettings, build_cache_ray  # noqa: E402
from transmiter_deploy.features.models import ModelSpec, load_model  # noqa: E402
from transmiter_deploy.host import cpu_model  # noqa: E402


def draw_dataset(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (320, 240)) -> Path:
    """``images`` noisy JPEGs (a coloured block on noise) in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for index in range(images):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        x, y = rng.integers(0, min(size) // 2, size=2)
        pixels[y : y + size[1] // 2, x : x + size[0] // 2] = rng.integers(0, 255, size=3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="builds per engine; the median is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-2core")
    args = parser.parse_args()

    import ray
    import torch

    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    spec = ModelSpec(args.model, init_seed=0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        dataset = open_dataset(draw_dataset(work / "images", args.images))
        model = load_model(spec)
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        cluster_start = time.perf_counter() - start
        # rounds interleaved (local, ray, local, ray, ...): a shared machine's load falls on both
        local_seconds, ray_seconds = [], []
        try:
            for round_ in range(args.rounds):
                start = time.perf_counter()
                build_cache(model, dataset, work / f"local{round_}", batch_size=args.batch_size, progress=False)
                local_seconds.append(time.perf_counter() - start)
                start = time.perf_counter()
                build_cache_ray(spec, dataset, work / f"ray{round_}", RayCacheSettings(),
                                batch_size=args.batch_size, progress=False)
                ray_seconds.append(time.perf_counter() - start)
                print(f"round {round_}: local {local_seconds[-1]:.1f} s, ray {ray_seconds[-1]:.1f} s", flush=True)
            workers = int(ray.cluster_resources().get("CPU", 1))
        finally:
            ray.shutdown()
        local, distributed = load_cache(work / "local0"), load_cache(work / "ray0")
        same = (local.fingerprint == distributed.fingerprint and bool((local.labels == distributed.labels).all())
                and float((local.features - distributed.features).abs().max()) <= 1e-6)

    def figure(seconds: list[float]) -> dict:
        median = statistics.median(seconds)
        return {"seconds": [round(s, 2) for s in seconds], "median_seconds": round(median, 2),
                "images_per_second": round(args.images / median, 1)}

    result = {
        "what": "feature cache throughput, Ray engine vs local engine, same model and images",
        "created": utc_now(),
        "command": " ".join(["python", "benchmarks/ray_cache.py", *sys.argv[1:]]),
        "model": f"{args.model} (random weights, seed 0)",
        "images": args.images, "image_size": "320x240 JPEG", "batch_size": args.batch_size,
        "local": {**figure(local_seconds), "engine": f"build_cache, one process, torch {torch.get_num_threads()} threads, "
                                                    "decoding in the loop (num_workers 0)"},
        "ray": {**figure(ray_seconds), "engine": f"build_cache_ray on a local cluster of {cpus} CPUs: {workers} encoding "
                                                 "actors (1 torch thread each), decoding in Ray tasks",
                "includes": "actor start and a model load per actor, and the driver's model load",
                "cluster_start_seconds": round(cluster_start, 2)},
        "caches_equal": same,
        # the machine is shared: the 1-minute load average before and after says how much
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "host": {"cpu": cpu_model(), "cores": cpus, "machine": platform.machine(), "python": platform.python_version(),
                 "ray": ray.__version__, "versions": library_versions()},
    }
    result["ray_over_local"] = round(result["ray"]["images_per_second"] / result["local"]["images_per_second"], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Feature cache throughput: Ray engine vs local engine ({cpu_model()}, {cpus} cores)", "",
        f"{args.images} images ({result['image_size']}), {result['model']}, batch {args.batch_size}, "
        f"median of {args.rounds} builds. Measured by `{result['command']}`.", "",
        "| engine | images/s | median s | builds (s) |", "|---|---|---|---|",
        *(f"| {name} | {result[name]['images_per_second']} | {result[name]['median_seconds']} | "
          f"{', '.join(str(s) for s in result[name]['seconds'])} |" for name in ("local", "ray")), "",
        f"- local: {result['local']['engine']}.",
        f"- ray: {result['ray']['engine']}; each build {result['ray']['includes']}. "
        f"Starting the cluster took {result['ray']['cluster_start_seconds']} s more (once per process).",
        f"- Ray / local: {result['ray_over_local']}x. The caches are equal: {same}.",
        f"- Rounds interleaved (local, ray, local, ray...). The machine is shared: its 1-minute load "
        f"average was {result['load_average_1min']['before']} before and {result['load_average_1min']['after']} "
        f"after, on {cpus} cores. Both figures are below an idle machine's, and an engine running more "
        "processes gets a larger share of a contended CPU, so the ratio is not an idle machine's ratio.", "",
    ]
    (args.out / "ray_cache.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
