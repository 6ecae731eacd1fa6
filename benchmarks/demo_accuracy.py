"""Accuracy of the method on the demo world: every task, every row, base / novel / HM.

    python benchmarks/demo_accuracy.py --weights transmiter_deploy/demo/weights \
        --json benchmarks/results/demo_accuracy.json --markdown benchmarks/results/demo_accuracy.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from transmiter_deploy.demo.experiment import ExperimentSettings, run_task
from transmiter_deploy.demo.tasks import TASKS


def markdown(rows: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.1f}"

    lines = ["| task | model | base | novel | HM |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['task']} | {r['model']} | {cell(r['base'])} | {cell(r['novel'])} | {cell(r['hm'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--task", action="append", choices=list(TASKS))
    parser.add_argument("--work", type=Path, help="keep rendered data and caches here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        for name in args.task or list(TASKS):
            start = time.perf_counter()
            rows += run_task(TASKS[name], args.weights, work / name, ExperimentSettings())
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
