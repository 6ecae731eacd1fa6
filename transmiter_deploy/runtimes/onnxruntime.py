"""ONNX Runtime: the one way the toolkit makes a session, and the runner over it.

Export verification, validation, the runners and the benchmark all build their
sessions with :func:`ort_session`, so thread settings are decided in one place; every
graph runs with ONNX Runtime's default optimisation, as in a user's own session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError, IntegrityError, VerificationError
from . import load_probe
from .base import InputSpec, Runner, check_qdq_scales, graph_precision, manifest_precision, verify_graph_data
from .registry import precision

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_session(path: Path | bytes, provider: str = "CPUExecutionProvider",
                threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime session (CPU by default) for a graph: a file, or a serialised model held in
    memory (``bytes``).

    A graph with external data (``model.onnx`` + ``model.onnx.data``) is loaded from its path:
    ONNX Runtime then reads the data file beside the graph (the location is relative, so a moved
    export still loads) without a second copy in Python's memory, which matters for the graphs
    that need external data at all (over 2 GiB). ``bytes`` must hold every tensor: ONNX Runtime
    has no directory to resolve a location against. Checking the data files against the export
    manifest is the caller's (:func:`~.base.verify_graph_data`; the runner does it on activation):
    the export's own sessions load graphs it has just written into its staging directory.

    Every precision runs with ONNX Runtime's default graph optimisation, as a user's own session
    would: the graphs the toolkit writes are made to load that way (deploy/consumer_safety.py), so
    the toolkit checks what its users will run. ``threads`` sets the intra-op pool (one
    sequential inter-op thread); None leaves ONNX Runtime's default (one per core).
    ``spinning=False`` stops idle pool threads from busy-waiting after a run: needed
    when several sessions take turns in one process, where one session's spinning
    threads would steal the cores the next one runs on.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=[provider])


def require_loadable(paths: list[Path], levels: tuple[str, ...] = load_probe.LEVELS) -> None:
    """Every graph in ``paths`` loads and runs in ONNX Runtime's CPU provider at each optimisation
    level (default: all four), probed in a child process (:mod:`.load_probe`); else
    VerificationError naming the graph and the level. The toolkit calls this on each graph it
    writes before its own sessions load it, so a graph that would crash a user's session fails
    the export in one line instead of killing it."""
    failure = load_probe.probe([Path(path) for path in paths], levels)
    if failure is not None:
        raise VerificationError(failure)


def run_session(session, array: np.ndarray) -> np.ndarray:
    """The first output of a single-input session."""
    return session.run(None, {session.get_inputs()[0].name: array})[0]


def _loadable_precision(path: Path) -> str:
    try:
        return graph_precision(path)
    except InputError as exc:
        raise InputError(f"ONNX Runtime cannot load {path}: {exc}") from exc


class OnnxRuntimeRunner(Runner):
    """An ONNX graph on ONNX Runtime's CPU or CUDA execution provider.

    (ORT's TensorRT provider is not offered: the onnxruntime-gpu pin that ModelOpt needs
    cannot drive TensorRT 11, DESIGN.md section 4; engines run through runtimes/tensorrt.py.)
    """

    def __init__(self, path: Path, provider: str = "cpu", max_batch: int | None = None,
                 threads: int | None = None, spinning: bool = True, precision: str | None = None) -> None:
        """``threads`` and ``spinning`` as in :func:`ort_session`; ``precision`` defaults to what the
        export manifest beside the graph records (:func:`~.base.graph_precision`)."""
        super().__init__()
        if provider not in PROVIDERS:
            raise InputError(f"unknown ONNX Runtime provider '{provider}' (known: {', '.join(PROVIDERS)})")
        reason = self.unavailable(provider=provider)
        if reason is not None:
            raise DependencyError(reason)
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ONNX graph not found: {self.path}")
        self.provider, self.max_batch, self.threads, self.spinning = provider, max_batch, threads, spinning
        # a bare graph (no manifest) is inspected on activation: construction reads no graph
        self.precision = precision or manifest_precision(self.path)
        self.name, self.graph = f"onnxruntime-{provider}", self.path.name
        self.session = None

    @classmethod
    def unavailable(cls, provider: str = "cpu", **_: object) -> str | None:
        wanted = PROVIDERS.get(provider)
        if wanted is None:
            return f"unknown ONNX Runtime provider '{provider}'"
        if wanted not in available_providers():
            return f"ONNX Runtime here has no {wanted} (available: {', '.join(available_providers())})"
        if provider != "cpu":
            import torch

            if not torch.cuda.is_available():
                # onnxruntime-gpu lists CUDA on machines without a GPU, then quietly runs on the CPU
                return f"ONNX Runtime's {wanted} needs a CUDA GPU; none is visible"
        return None

    def activate_impl(self) -> None:
        # external data checked against the manifest before anything reads it (one line, exit 2)
        try:
            verify_graph_data(self.path)
        except IntegrityError:
            raise
        except InputError as exc:  # not an ONNX graph at all
            raise InputError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.precision = self.precision or _loadable_precision(self.path)
        if precision(self.precision).qdq:
            import onnx

            check_qdq_scales(onnx.load(str(self.path)), str(self.path))
        try:
            self.session = ort_session(self.path, PROVIDERS[self.provider], self.threads, self.spinning)
        except Exception as exc:  # ORT raises its own exception types for corrupt graphs
            raise InputError(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}") from exc
        if PROVIDERS[self.provider] not in self.session.get_providers():
            self.session = None
            raise DependencyError(f"ONNX Runtime could not start {PROVIDERS[self.provider]} here")
        graph_input = self.session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.input_spec = InputSpec(graph_input.name, shape, max_batch=self.max_batch)

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_spec.name: batch})[0], dtype=np.float32)

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [output.name for output in self.session.get_outputs()]
        return {name: np.asarray(value, dtype=np.float32)
                for name, value in zip(names, self.session.run(None, {self.input_spec.name: batch}))}
