"""The runner interface every runtime implements, the input check and host settings they share.

A runner takes a float32 batch shaped like the graph's input and returns the
graph's output as a float32 array. Runners follow Polygraphy's life cycle:
constructing one validates its configuration and loads nothing; ``activate()``
(or entering a ``with`` block) loads the model, session or engine;
``deactivate()`` frees it. A benchmark or an export can therefore hold many
runners and pay for one at a time. Every runner checks its input the same way
(dtype, rank, fixed dimensions, batch range) and refuses a mismatch in one line,
so a wrong array never reaches a runtime that would crash or silently broadcast.

Runners are built by loaders, as Polygraphy's are (``SessionFromOnnx`` hands a session to
``OnnxrtRunner``): a runtime's module holds a loader that turns a checked graph (or a module,
or an engine) into what its runtime runs, with the runtime's own options decided there from
the registry entry and the caller's :class:`RunSettings`; callers never pass a runtime's own
options. :class:`GraphRunner` runs the checks every graph needs before any runtime reads it
(``onnx_files.checked_graph``) once, in one place, and hands the checked graph to the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError, IntegrityError
from .registry import REFERENCE_PRECISION


@dataclass(frozen=True)
class RunSettings:
    """How a caller wants its runners to use this host, in terms common to every runtime; each
    runtime's loader turns them into its own options (ONNX Runtime: the intra-op pool and
    spinning; OpenVINO: its thread count; TensorRT: the engine's batch profile and folder)."""

    threads: int | None = None  # CPU threads a runner may use (None: the runtime's default)
    # other runners take turns in this process (a benchmark): idle threads must not busy-wait
    # after a run, or they steal the cores the next runner runs on
    shares_process: bool = False
    max_batch: int | None = None  # the largest batch the caller runs (None: any the graph takes)
    compiled_dir: Path | None = None  # where runtimes that compile a graph keep it (TensorRT engines)


@dataclass(frozen=True)
class GraphFile:
    """An ONNX graph file to run, and its precision when the caller knows it (a bare graph with no
    manifest beside it, as the benchmark's); None: as the manifest records it, else its nodes."""

    path: Path
    precision: str | None = None


@dataclass(frozen=True)
class GraphInMemory:
    """A serialised graph holding all its tensors: what a caller that runs many variants of one
    graph (deploy/qdq_fallback.py ranks each quantised node) runs without writing each to disk."""

    serialized: bytes
    precision: str
    name: str = "graph in memory"


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

    @classmethod
    def environment(cls, **options: Any) -> dict:
        """What decides this runtime's results here besides what it runs (e.g. ONNX Runtime's
        execution providers): part of the key of an export's validation step."""
        return {}

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




class GraphRunner(Runner):
    """A runner over an ONNX graph (:class:`GraphFile`, a path, or :class:`GraphInMemory`). On
    activation the checks every graph needs run first, here for every runtime
    (``onnx_files.checked_graph``: external data against the manifest, the precision, Q/DQ
    scales); then the runtime's loader reads the checked graph (``load_impl``).

    Subclasses set ``runtime`` (how messages name the runtime, e.g. "ONNX Runtime") and
    ``loader`` (their runtime's loader), and implement ``load_impl(graph)`` -> the graph's input
    shape and name (the loader called through :meth:`loaded`), ``infer_impl``, ``outputs_impl``
    and ``deactivate_impl``."""

    runtime = "the runtime"

    def __init__(self, source: Path | str | GraphFile | GraphInMemory, settings: RunSettings = RunSettings()) -> None:
        from .onnx_files import manifest_precision

        super().__init__()
        source = GraphFile(Path(source)) if isinstance(source, (str, Path)) else source
        self.source, self.settings = source, settings
        if isinstance(source, GraphInMemory):
            self.graph, self.precision = source.name, source.precision
            return
        if not source.path.is_file():
            raise InputError(f"ONNX graph not found: {source.path}")
        self.graph = source.path.name
        # a bare graph (no manifest) is inspected on activation: construction reads no graph
        self.precision = source.precision or manifest_precision(source.path)

    def activate_impl(self) -> None:
        from .onnx_files import checked_graph, checked_graph_in_memory

        try:
            if isinstance(self.source, GraphInMemory):
                graph = checked_graph_in_memory(self.source)
            else:
                graph = checked_graph(self.source.path, self.precision)
        except IntegrityError:
            raise
        except InputError as exc:  # not an ONNX graph at all
            where = self.graph if isinstance(self.source, GraphInMemory) else self.source.path
            raise InputError(f"{self.runtime} cannot load {where}: {exc}") from exc
        self.precision = graph.precision
        shape, name = self.load_impl(graph)
        self.input_spec = InputSpec(name, shape, max_batch=self.settings.max_batch)

    def loaded(self, graph: Any) -> Any:
        """What the runtime's loader (``self.loader``) makes of ``graph``; whatever the runtime
        raises for a graph it cannot read becomes one InputError line naming the graph."""
        try:
            return self.loader(graph)
        except Exception as exc:  # each runtime raises its own exception types for unreadable graphs
            where = graph.path if graph.path is not None else self.graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{self.runtime} cannot load {where}: {first}") from exc

    def load_impl(self, graph: Any) -> tuple[tuple[int | None, ...], str]:  # pragma: no cover - interface
        """Load the checked graph (``onnx_files.CheckedGraph``, or a checked in-memory graph);
        return its input's shape (None for dynamic axes) and name."""
        raise NotImplementedError
