"""Footprint of the C++ runtime per architecture: what a device builder asks before adopting it.

- Sizes of `libtransmiter.a` and `transmiter_infer`, as built (Release) and stripped (the static
  library with --strip-debug, as Debian packages ship static libraries; the program with
  --strip-all), for every build given (x86-64 natively, aarch64 cross-built by `make cpp-aarch64`),
  and the ONNX Runtime library each build loads.
- Peak RSS (the kernel's ru_maxrss of the child) of `transmiter_infer` on the demo export: the head
  backend on 16 feature vectors, the onnxruntime backend on 16 demo images; median of 3 runs (GNU
  time's %M).
  Measured only where the build runs natively: under qemu-user the RSS is the emulator's (its
  translation buffers included), not the program's, so no aarch64 RSS is reported from here.

    make export cpp cpp-aarch64
    .venv/bin/python benchmarks/cpp_footprint.py [--export export/out/demo/onnx] \\
        [--build build/cpp] [--build build/cpp-aarch64]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmiter_deploy.host import cpu_model  # noqa: E402

def elf_arch(path: Path) -> str:
    machine = int.from_bytes(path.read_bytes()[18:20], "little")
    return {62: "x86_64", 183: "aarch64"}.get(machine, f"e_machine {machine}")


def strip_tool(arch: str) -> str:
    tool = "strip" if arch == platform.machine() else f"{arch}-linux-gnu-strip"
    if not shutil.which(tool):
        sys.exit(f"cpp_footprint: {tool} is not installed")
    return tool


def stripped_size(path: Path, arch: str, mode: str) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / path.name
        shutil.copy(path, copy)
        subprocess.run([strip_tool(arch), mode, str(copy)], check=True)
        return copy.stat().st_size


def configured_library(build: Path) -> Path | None:
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith("ONNXRUNTIME_LIBRARY:"):
            value = line.split("=", 1)[1]
            return Path(value) if value else None
    return None


def peak_rss_mib(command: list[str]) -> float:
    """Peak RSS of one run of `command` in MiB, as GNU time reports it (%M, KiB); the run must succeed.

    Not os.wait4 on our own child: Linux carries a process's RSS high-water mark across execve, so
    a program spawned from this Python process would report at least the interpreter's RSS
    (measured: 35 MiB for the head backend). GNU time forks the program from its own small process.
    """
    if not Path("/usr/bin/time").is_file():
        sys.exit("cpp_footprint: GNU time is not installed (Debian: apt-get install time)")
    with tempfile.NamedTemporaryFile(mode="r", suffix=".rss") as report:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"cpp_footprint: {' '.join(command)} failed: {done.stderr.strip()}")
        return int(report.read().split()[-1]) / 1024


def measure(build: Path, export: Path, images: list[Path], scratch: Path) -> dict:
    infer, library = build / "transmiter_infer", build / "libtransmiter.a"
    for path in (infer, library):
        if not path.is_file():
            sys.exit(f"cpp_footprint: {path} is missing (make cpp / make cpp-aarch64)")
    arch = elf_arch(infer)
    ort = configured_library(build)
    record = {
        "build": shown(build), "arch": arch,
        "libtransmiter.a": {"bytes": library.stat().st_size, "stripped_debug": stripped_size(library, arch, "--strip-debug")},
        "transmiter_infer": {"bytes": infer.stat().st_size, "stripped": stripped_size(infer, arch, "--strip-all")},
        "onnxruntime_library": {"path": shown(ort), "bytes": ort.stat().st_size} if ort and ort.is_file() else None,
        "backends": subprocess.run([str(infer), "--backends"], capture_output=True, text=True).stdout.split()
        if arch == platform.machine() else None,
    }
    if arch != platform.machine():
        record["peak_rss_mib"] = None
        record["peak_rss_note"] = "not measured: runs here only under qemu-user, whose RSS is the emulator's"
        return record
    manifest = export / "manifest.json"
    feature_dim = json.loads(manifest.read_text())["feature_dim"]
    features = scratch / "features.npy"
    np.save(features, np.random.default_rng(0).standard_normal((16, feature_dim)).astype(np.float32))
    runs = {"head": [str(infer), "--manifest", str(manifest), "--features", str(features), "--quiet"],
            "onnxruntime": [str(infer), "--manifest", str(manifest), "--image", *map(str, images), "--quiet"]}
    record["peak_rss_mib"] = {name: round(statistics.median(peak_rss_mib(command) for _ in range(3)), 1)
                              for name, command in runs.items() if name in record["backends"]}
    return record


def shown(path: Path) -> str:
    """A path as the results record it: relative to the checkout where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def markdown(records: list[dict], export: Path) -> str:
    def mib(n: int | None) -> str:
        return "–" if n is None else f"{n / 2**20:.2f} MiB"

    lines = [f"C++ runtime footprint (benchmarks/cpp_footprint.py; demo export {shown(export)}; host {cpu_model()})", "",
             "| build | arch | libtransmiter.a | stripped (debug) | transmiter_infer | stripped | ONNX Runtime library "
             "| peak RSS, head backend | peak RSS, onnxruntime backend |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in records:
        rss = r["peak_rss_mib"] or {}
        ort = r["onnxruntime_library"]
        lines.append(f"| {Path(r['build']).name} | {r['arch']} | {mib(r['libtransmiter.a']['bytes'])} | "
                     f"{mib(r['libtransmiter.a']['stripped_debug'])} | {mib(r['transmiter_infer']['bytes'])} | "
                     f"{mib(r['transmiter_infer']['stripped'])} | {mib(ort['bytes']) if ort else '–'} | "
                     + " | ".join(f"{rss[b]:.1f} MiB" if b in rss else "–" for b in ("head", "onnxruntime")) + " |")
    lines += ["", "Peak RSS: GNU time's %M for one `transmiter_infer` run on 16 inputs (median of 3), measured"
              " natively only: under qemu-user the RSS would be the emulator's."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=ROOT / "export/out/demo/onnx", help="the demo export's onnx/ directory")
    parser.add_argument("--build", type=Path, action="append", help="a build directory (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-2core/cpp_footprint")
    args = parser.parse_args()
    builds = args.build or [ROOT / "build/cpp", ROOT / "build/cpp-aarch64"]
    if not (args.export / "manifest.json").is_file():
        sys.exit(f"cpp_footprint: no export at {args.export} (make export)")
    images = sorted((args.export.parent / "data" / "test").glob("*/*.png"))[:16]
    if len(images) < 16:
        sys.exit(f"cpp_footprint: fewer than 16 test images under {args.export.parent / 'data' / 'test'}")
    with tempfile.TemporaryDirectory() as scratch:
        records = [measure(build, args.export, images, Path(scratch)) for build in builds]
    result = {"host": {"cpu": cpu_model(), "machine": platform.machine()}, "export": shown(args.export), "builds": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(records, args.export))
    print(markdown(records, args.export))


if __name__ == "__main__":
    main()
