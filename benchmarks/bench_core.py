"""Speed and memory of the method's core on cached logits (issue: core).

Times extraction (reference settings: 10 epochs, batch 128, C = D = 1024,
MLP ratio 4) over N cached samples and the Procrustes transfer over N
samples, and reports peak resident memory. Runs on whatever CPU it is given;
the thread count is set explicitly and recorded.

    python benchmarks/bench_core.py                     # N = 10000, 2 threads
    python benchmarks/bench_core.py --samples 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.artifacts import library_versions, utc_now
from transmiter_deploy.method.extraction import ExtractionSettings, add_logit_noise, distillation_loss, extract
from transmiter_deploy.host import cpu_model
from transmiter_deploy.method.training import train_adapter
from transmiter_deploy.method.transfer import transfer


def synthetic_logits(samples: int, width: int, feature_dim: int, seed: int) -> torch.Tensor:
    """CLIP-like logits: 100 * cosine between random unit features and a random head."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(samples, feature_dim, generator=generator), dim=1)
    head = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator), dim=1)
    return 100.0 * features @ head.T


def unconstrained_extraction_s(source, teacher, config, settings, progress) -> float:
    """The same loop without the orthogonality parametrisation: the floor the constraint adds to."""
    adapter = TransMiterAdapter(config, seed=settings.seed)

    def batch_loss(indices, generator):
        inputs = add_logit_noise(source[indices], settings.noise_probability, settings.noise_scale, generator)
        return distillation_loss(adapter.task_logits(inputs), teacher[indices], settings.teacher_temperature)

    start = time.perf_counter()
    train_adapter(adapter, len(source), batch_loss, settings, "unconstrained", progress)
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=1024, help="logit width C (= latent D)")
    parser.add_argument("--classes", type=int, default=100, help="task classes K")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--orthogonal-map", default="cayley", choices=["cayley", "matrix_exp", "householder", "qr"])
    parser.add_argument("--floor", action="store_true",
                        help="also time the loop without the orthogonality constraint (reference floor)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    source = synthetic_logits(args.samples, args.width, 512, seed=1)
    target = synthetic_logits(args.samples, args.width, 768, seed=2)
    teacher = source[:, : args.classes] * 1.5
    config = AdapterConfig(num_task_classes=args.classes, logit_width=args.width, latent_dim=args.width)
    settings = ExtractionSettings(epochs=args.epochs, orthogonal_map=args.orthogonal_map)

    start = time.perf_counter()
    adapter, history = extract(source, teacher, config, settings, progress=sys.stderr.isatty())
    extraction_s = time.perf_counter() - start

    start = time.perf_counter()
    transfer(adapter, source, target, regularisation=500.0)
    transfer_s = time.perf_counter() - start

    floor_s = None
    if args.floor:
        floor_s = unconstrained_extraction_s(source, teacher, config, settings, sys.stderr.isatty())

    steps = args.epochs * -(-args.samples // settings.batch_size)
    result = {
        "date": utc_now(),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "samples": args.samples,
        "logit_width": args.width,
        "task_classes": args.classes,
        "epochs": args.epochs,
        "orthogonal_map": args.orthogonal_map,
        "extraction_s": round(extraction_s, 2),
        "extraction_ms_per_step": round(1000 * extraction_s / steps, 1),
        "unconstrained_extraction_s": round(floor_s, 2) if floor_s is not None else None,
        "transfer_s": round(transfer_s, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "final_loss": history[-1],
    }
    print(f"extraction  {result['extraction_s']:8.2f} s  ({steps} steps, {result['extraction_ms_per_step']} ms/step, "
          f"{args.epochs} epochs x {args.samples} samples, C = D = {args.width})")
    if floor_s is not None:
        print(f"  without the orthogonality constraint: {floor_s:8.2f} s ({1000 * floor_s / steps:.1f} ms/step)")
    print(f"transfer    {result['transfer_s']:8.3f} s  ({args.samples} samples)")
    print(f"peak RSS    {result['peak_rss_mib']:8.1f} MiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
