"""MACs and parity of the exported deployment graph at real CLIP shapes (random weights).

Builds the target tower from open_clip with random weights (speed and cost do
not depend on the values), a synthetic zero-shot head (C = 1024 rows) and an
adapter (D = 1024, MLP ratio 4, K task classes), exports through the same
code path as ``transmiter export-onnx`` and prints the parity and MAC tables.

    python benchmarks/onnx_macs.py --model ViT-B-16 --model ViT-L-14 --json benchmarks/results/cpu-2core/onnx_macs.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from transmiter_deploy.benchmark.variants import synthetic_head_and_adapter
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.deploy.onnx_export import ExportSettings, export_deployment, format_report, parity_pixels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="open_clip architecture (repeatable)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--fp16", action="store_true", help="also convert and check the mixed-precision graph")
    parser.add_argument("--calibration-images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.model:
        model = load_model(ModelSpec(name, init_seed=0))
        head, artifact = synthetic_head_and_adapter(model, args.width, args.classes)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            report = export_deployment(model, head, artifact, f"{out}/export", parity_pixels(model, None, args.samples),
                                       ExportSettings(precisions=("fp32", "fp16") if args.fp16 else ("fp32",),
                                                      calibration_images=args.calibration_images), log=lambda _line: None)
        print(f"== {name} (random weights; d = {model.feature_dim}, C = D = {args.width}, "
              f"K = {args.classes}), export + verification {time.perf_counter() - start:.1f} s")
        print(format_report(report))
        results[name] = {"macs": report.macs, "checks": report.parity["checks"], "timings": report.timings}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
