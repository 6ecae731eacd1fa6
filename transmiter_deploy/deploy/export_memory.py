"""The memory an export will need, estimated from the image tower's size before anything is
traced, so that a machine that cannot hold it fails in one line with the estimate and the way
out, not minutes later in an out-of-memory kill.

The estimate is linear in the tower's fp32 weight bytes G: a fixed cost (the interpreter with
torch, onnx and ONNX Runtime loaded; more for a graph with external data), plus a factor of G
for the largest phase of the precisions exported (the PyTorch tower stays loaded throughout;
the exporter's trace, ONNX Runtime's parity session and the fp16 converter each hold about one
more copy of the weights). A graph under the external-data threshold is also read whole in
places (protobuf parses a file that holds its tensors in one piece), so its factor is larger.
The figures cover the peaks measured by ``benchmarks/large_models.py`` on this project's
machines (``benchmarks/results/cpu-2core/large_models.md``: ViT-B-16 and ViT-L-14 hold their
tensors, ViT-H-14 and ViT-bigG-14 have external data), and for int8 ``benchmarks/int8_memory.py``
(ModelOpt's calibration, ViT-L-14: 14.1 GB for a 1.2 GB graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from ..errors import DependencyError, InputError

INTERPRETER_BYTES = 900 << 20  # measured: python with torch, open_clip, onnx, onnxruntime imported
# peak RSS over the tower's fp32 weight bytes, per precision exported (the export's largest phase),
# for a graph that holds its tensors (ViT-B-16, ViT-L-14: 0.9 GB + 9.5 G covers both) and for one
# with external data, whose fixed cost is larger and whose factor is smaller (ViT-H-14 8.8 GB with
# fp16; ViT-bigG-14, G = 7.4 GB: 16.2 GB in fp32, 17.9 GB with fp16, its largest phase ONNX
# Runtime's parity sessions beside the PyTorch tower)
FACTORS = {"fp32": 9.5, "fp16": 9.5, "int8": 11.5}
EXTERNAL_BASE_BYTES = 5_000_000_000
FACTORS_EXTERNAL = {"fp32": 1.6, "fp16": 1.9, "int8": 11.5}
MEMORY_CHECK_ENV = "TRANSMITER_MEMORY_CHECK"  # "off": export whatever the estimate says


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int
    peak_bytes: int
    available_bytes: int
    limiting: str  # the precision whose phase sets the peak

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes


def available_bytes() -> int:
    """What this process can grow to: the kernel's MemAvailable plus what it holds already."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, KeyError, ValueError):  # not Linux: nothing to compare against
        return 1 << 62
    return available + resident


def estimate(weight_bytes: int, precisions: Iterable[str], available: int | None = None,
             external_data: bool = False) -> MemoryEstimate:
    """``external_data``: the graph passes the external-data threshold (onnx_files.save_graph)."""
    table = FACTORS_EXTERNAL if external_data else FACTORS
    factors = {name: table.get(name, max(table.values())) for name in precisions}
    limiting = max(factors, key=factors.get)
    peak = (EXTERNAL_BASE_BYTES if external_data else INTERPRETER_BYTES) + int(factors[limiting] * weight_bytes)
    return MemoryEstimate(weight_bytes, peak, available_bytes() if available is None else available, limiting)


def check_export_memory(weight_bytes: int, precisions: tuple[str, ...], what: str,
                        external_data: bool = False) -> MemoryEstimate:
    """Refuse (exit 3) an export this machine cannot hold, naming the estimate and what to do;
    ``TRANSMITER_MEMORY_CHECK=off`` skips the refusal (the estimate is still returned)."""
    setting = os.environ.get(MEMORY_CHECK_ENV, "on").strip().lower()
    if setting not in ("on", "off"):
        raise InputError(f"{MEMORY_CHECK_ENV} must be 'on' or 'off', got '{setting[:20]}'")
    result = estimate(weight_bytes, precisions, external_data=external_data)
    if result.fits or setting == "off":
        return result
    gb = 1e9
    fp32_only = estimate(weight_bytes, ("fp32",), result.available_bytes, external_data)
    if result.limiting != "fp32" and fp32_only.fits:
        way_out = (f"export fp32 alone here (--no-fp16, or export.precisions: [fp32]; about "
                   f"{fp32_only.peak_bytes / gb:.1f} GB), or the whole export on a machine with at least "
                   f"{result.peak_bytes / gb:.0f} GB free")
    else:
        way_out = f"use a machine with at least {result.peak_bytes / gb:.0f} GB of free memory"
    raise DependencyError(
        f"exporting {what} ({', '.join(precisions)}) needs about {result.peak_bytes / gb:.1f} GB of memory "
        f"({weight_bytes / gb:.2f} GB of fp32 weights); {result.available_bytes / gb:.1f} GB is available: {way_out} "
        f"({MEMORY_CHECK_ENV}=off exports anyway)")
