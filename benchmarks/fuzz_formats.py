"""The long fuzz run of every file format the Python side reads (tests/hostile/test_hostile_fuzz.py):
10,000 Hypothesis examples per format by default, outcome counts per format written to
``benchmarks/results/cpu-<cores>core/fuzz_formats.json`` and printed as a table.

    .venv/bin/python benchmarks/fuzz_formats.py [--examples 10000] [--only recipes,artifact]

A traceback in any example fails the run (exit 1) and pytest prints the shrunk example. The CI
run of the same tests uses 25 examples per format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--only", default="", help="pytest -k expression over the fuzz tests")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}core" / "fuzz_formats.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = out.with_suffix(".counts.json")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/hostile/test_hostile_fuzz.py")]
    if args.only:
        command += ["-k", args.only]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "FUZZ_EXAMPLES": str(args.examples),
                                                 "FUZZ_REPORT": str(report)})
    seconds = time.perf_counter() - start
    counts = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    payload = {"examples_per_format": args.examples, "seconds": round(seconds, 1), "pytest_exit": done.returncode,
               "formats": {fmt: {"examples": sum(c.values()), **c} for fmt, c in counts.items()}}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n| format | examples | result | refused (exit status: count) |\n|---|--:|--:|---|")
    for fmt, c in payload["formats"].items():
        refused = ", ".join(f"{k}: {v}" for k, v in c.items() if k.startswith("exit"))
        print(f"| {fmt} | {c['examples']} | {c.get('result', 0)} | {refused} |")
    print(f"\n{seconds:.0f} s; pytest exit {done.returncode}; written to {out}")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
