"""Load and run ONNX graphs in ONNX Runtime as a user's own session would, in a child process.

A graph that crashes ONNX Runtime (a segfault in its graph optimiser, say) would take the
process that loads it down with it; loading it first in a child turns that crash into one line
naming the graph and the optimisation level. The toolkit probes every graph it writes this way
(:func:`.onnx_files.require_loadable`) before any of its own sessions touch it.

The child runs this file as a script (``python load_probe.py LEVELS GRAPH...``), so it imports
only ONNX Runtime and numpy, not the toolkit. For each graph and level it prints
``trying<TAB><level><TAB><graph>`` before and ``ok`` after: when the child dies, the last
``trying`` line names what killed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# ONNX Runtime's four levels, in its own spelling; ORT_ENABLE_ALL is SessionOptions' default
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
          "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _run_one(path: str, level: str) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = 1  # a probe, not a benchmark: keep the cores for the parent
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {}
    for graph_input in session.get_inputs():  # batch 1 (every symbolic axis 1), zeros
        shape = [dim if isinstance(dim, int) else 1 for dim in graph_input.shape]
        feed[graph_input.name] = np.zeros(shape, dtype=DTYPES.get(graph_input.type, "float32"))
    session.run(None, feed)


def _child(levels: list[str], paths: list[str]) -> int:
    for path in paths:
        for level in levels:
            print(f"trying\t{level}\t{path}", flush=True)
            try:
                _run_one(path, level)
            except Exception as exc:  # ONNX Runtime's own exception types
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(f"error\t{level}\t{path}\t{message}", flush=True)
                return 3
            print("ok", flush=True)
    return 0


def probe(paths: list[Path], levels: tuple[str, ...] = LEVELS, timeout: float = 1800.0) -> str | None:
    """None when every graph in ``paths`` loads and runs at every level in a child process, else
    one line saying which graph failed, at which level and how (a signal, an error)."""
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"unknown ONNX Runtime optimisation level {unknown[0]} (known: {', '.join(LEVELS)})")
    if not paths:
        return None
    command = [sys.executable, os.path.abspath(__file__), ",".join(levels), *[str(path) for path in paths]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"loading {', '.join(p.name for p in paths)} in ONNX Runtime took more than {timeout:.0f} s"
    if done.returncode == 0:
        return None
    records = [line.split("\t", 3) for line in done.stdout.splitlines()]
    errors = [record for record in records if record[0] == "error" and len(record) == 4]
    if errors:
        _, level, path, message = errors[-1]
        return f"ONNX Runtime cannot load {path} at {level}: {message}"
    tried = [record for record in records if record[0] == "trying" and len(record) == 3]
    if done.returncode < 0:
        how = f"signal {signal.Signals(-done.returncode).name}"
    else:
        how = f"exit status {done.returncode}: {(done.stderr.strip().splitlines() or ['no message'])[-1]}"
    if not tried:
        return f"the ONNX Runtime load probe failed before loading any graph ({how})"
    _, level, path = tried[-1]
    return f"ONNX Runtime crashed loading {path} at {level} ({how})"


if __name__ == "__main__":
    # run as a script, this file's folder leads sys.path, and its onnxruntime.py would shadow
    # the real onnxruntime
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.exit(_child(sys.argv[1].split(","), sys.argv[2:]))
