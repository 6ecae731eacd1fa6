"""int8 on the demo bank: one backbone calibrated across the three demo tasks, every task gated.

Exports the shipped bank recipe (`export/recipes/demo-bank.yaml`, int8 among its precisions)
into build/int8-demo-bank/ (a failed gate is a result here, not an error) and records, per task,
the gate (accuracy of fp32 and int8, the criteria, agreement), the backbone nodes kept in fp32,
the graphs' sizes and the time of the int8 steps. The CPU is recorded: which near-ties flip depends
on its integer kernels (docs/export.md).

    python benchmarks/int8_demo_bank.py --out benchmarks/results/cpu-2core-precisions/int8_demo_bank.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    from transmiter_deploy.errors import VerificationError
    from transmiter_deploy.pipeline.bank_export import run_bank_export
    from transmiter_deploy.pipeline.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "int8-demo-bank")
    parser.add_argument("--recipe", type=Path, default=ROOT / "export" / "recipes" / "demo-bank.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    if "int8" not in recipe.export.precisions:
        parser.error(f"{args.recipe} does not ask for int8")
    start = time.perf_counter()
    failure = None
    try:
        run_bank_export(recipe, args.work, progress=False, log=lambda line: None)
    except VerificationError as exc:  # a failed gate: its tables are in the report
        failure = str(exc)
    seconds = time.perf_counter() - start
    report = json.loads((args.work / "report.json").read_text())
    onnx_dir = args.work / "onnx"
    manifest = json.loads((onnx_dir / "manifest.json").read_text()) if failure is None else {}
    sizes = {name: (onnx_dir / name).stat().st_size for name in ("model.onnx", "model_int8.onnx", "backbone.onnx",
                                                                  "backbone_int8.onnx") if (onnx_dir / name).is_file()}
    int8_steps = {step["name"]: round(step["seconds"], 1) for step in report["steps"]
                  if "int8" in step["name"] and step["status"] == "ran"}
    record = {
        "recipe": str(args.recipe.relative_to(ROOT)), "cpu": cpu_name(), "seconds": round(seconds, 1),
        "passed": failure is None, "failure": failure,
        "calibration": manifest.get("backbone", {}).get("calibration", {}).get("int8"),
        "fp32_nodes_kept": manifest.get("backbone", {}).get("fp32_nodes_kept", {}).get("int8"),
        "bytes": sizes,
        "model_int8_vs_model": round(sizes["model_int8.onnx"] / sizes["model.onnx"], 3) if len(sizes) == 4 else None,
        "int8_steps_s": int8_steps,
        "gates": [{key: gate.get(key) for key in ("task", "images", "samples", "passed", "top1_agreement", "accuracy",
                                                  "criteria", "first_try", "fallback")} for gate in report["gates"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for gate in record["gates"]:
        accuracy = gate["accuracy"] or {}
        hm = {name: round(values["hm"], 2) for name, values in accuracy.items()}
        print(f"{gate['task']}: {'pass' if gate['passed'] else 'FAIL'}, agreement {gate['top1_agreement']:.2%}, HM {hm}")
    print(f"kept in fp32: {record['fp32_nodes_kept']}; model_int8/model {record['model_int8_vs_model']}; "
          f"{seconds:.0f} s; -> {args.out}")


if __name__ == "__main__":
    main()
