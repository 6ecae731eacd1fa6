"""Facts about the machine (recorded next to every benchmark figure), and its memory."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's ``malloc_trim``).

    Large exports free whole copies of a model's weights between phases (a traced graph, an
    ONNX Runtime session); glibc keeps freed heap pages mapped, so without this the next phase
    starts from the previous one's peak. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)
