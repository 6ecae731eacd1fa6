"""The runner interface every runtime implements, and the input check they share.

A runner takes a float32 batch shaped like the graph's input and returns the
graph's output as a float32 array. Runners follow Polygraphy's life cycle:
constructing one validates its configuration and loads nothing; ``activate()``
(or entering a ``with`` block) loads the model, session or engine;
``deactivate()`` frees it. A benchmark or an export can therefore hold many
runners and pay for one at a time. Every runner checks its input the same way
(dtype, rank, fixed dimensions, batch range) and refuses a mismatch in one line,
so a wrong array never reaches a runtime that would crash or silently broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifacts import read_json
from ..errors import InputError, IntegrityError
from .registry import PRECISIONS, REFERENCE_PRECISION, precision_from_manifest

EXPORT_MANIFEST = "manifest.json"  # written beside every exported graph (deploy/onnx_export.py)


@dataclass(frozen=True)
class InputSpec:
    """What a runner accepts: float32, this rank, these fixed sizes (None = the batch axis)."""

    name: str
    shape: tuple[int | None, ...]
    min_batch: int = 1
    max_batch: int | None = None

    def check(self, array: np.ndarray, runner: str) -> None:
        if not isinstance(array, np.ndarray):
            raise InputError(f"{runner}: input must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise InputError(f"{runner}: input '{self.name}' must be float32, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise InputError(f"{runner}: input '{self.name}' must have rank {len(self.shape)} "
                             f"{self._describe()}, got shape {tuple(array.shape)}")
        for axis, (want, got) in enumerate(zip(self.shape[1:], array.shape[1:]), start=1):
            if want is not None and want != got:
                raise InputError(f"{runner}: input '{self.name}' must be {self._describe()}, "
                                 f"got {tuple(array.shape)} (axis {axis})")
        batch = array.shape[0]
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            upper = self.max_batch if self.max_batch is not None else "any"
            raise InputError(f"{runner}: batch {batch} is outside {self.min_batch}..{upper}")

    def _describe(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.shape) + ")"


class Runner:
    """Base of every runner: the life cycle, the input check, the timed call.

    Subclasses implement ``activate_impl`` (load; set ``self.input_spec`` if it comes
    from the loaded graph), ``infer_impl`` (one batch, already checked) and
    ``deactivate_impl`` (free), and ``unavailable`` (why this runtime cannot run here).
    """

    name: str = "runner"  # the runtime, e.g. onnxruntime-cpu
    graph: str = "-"  # what it runs, e.g. model_fp16.onnx
    precision: str = REFERENCE_PRECISION
    input_spec: InputSpec | None = None

    def __init__(self) -> None:
        self.active = False

    @classmethod
    def unavailable(cls, **options: Any) -> str | None:
        """None when this runner can run here with these options, else the reason it cannot."""
        return None

    def activate(self) -> "Runner":
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._require_active()
        self.input_spec.check(batch, self.name)
        return self.infer_impl(batch)

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph, by name, in the graph's order (a task bank has one per
        task); ``infer`` returns the first."""
        self._require_active()
        self.input_spec.check(batch, self.name)
        return self.outputs_impl(batch)

    def timed_call(self, batch: np.ndarray) -> Callable[[], object]:
        """A zero-argument call that runs ``batch`` to completion: what a benchmark times.
        Runtimes that keep inputs on a device place them there first (outside the call)."""
        self._require_active()
        self.input_spec.check(batch, self.name)
        return lambda: self.infer_impl(batch)

    def _require_active(self) -> None:
        if not self.active:
            raise RuntimeError(f"{self.name}: activate() the runner (or use it in a with block) before running it")

    def activate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def deactivate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Runtimes whose graphs can have several outputs override this."""
        return {"output": self.infer_impl(batch)}


def manifest_precision(path: Path) -> str | None:
    """The precision the export manifest beside an ONNX graph records for it, if there is one."""
    path = Path(path)
    manifest = path.parent / EXPORT_MANIFEST
    if not manifest.is_file():
        return None
    files = read_json(manifest, "export manifest").get("files")
    entry = files.get(path.name) if isinstance(files, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("precision"), str):
        return precision_from_manifest(entry["precision"]).name
    return None


def graph_precision(path: Path) -> str:
    """The precision of an ONNX graph: as the export manifest beside it records, else as its
    nodes and tensors show (Q/DQ nodes: int8; float16 initialisers: fp16). Never read from the
    file name."""
    recorded = manifest_precision(path)
    if recorded is not None:
        return recorded
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise InputError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from exc
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return next(p.name for p in PRECISIONS.values() if p.qdq)
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return next(p.name for p in PRECISIONS.values() if p.manifest_name == "mixed-fp16")
    return REFERENCE_PRECISION


def check_qdq_scales(graph: Any, where: str) -> None:
    """Refuse a Q/DQ graph (an ``onnx.ModelProto``) whose quantisation scales are zero or not
    finite: ONNX Runtime and TensorRT would load it and return NaN or garbage."""
    from onnx import numpy_helper

    values = {tensor.name: tensor for tensor in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    for node in graph.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        tensor = values.get(node.input[1])
        if tensor is None:
            continue  # a computed scale: nothing to read statically
        scale = numpy_helper.to_array(tensor).astype(np.float64)
        if scale.size == 0 or not np.isfinite(scale).all() or (scale == 0).any():
            raise IntegrityError(f"{where}: {node.op_type} node '{node.name or node.output[0]}' has a zero or "
                                 f"non-finite scale (first values {scale.ravel()[:4].tolist()})")
