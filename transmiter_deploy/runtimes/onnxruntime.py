"""ONNX Runtime: the one way the toolkit makes a session, its loader and the runner over it.

Export verification, validation, the runners and the benchmark all get their sessions
through :class:`OnnxRuntimeRunner` (built by the registry), whose loader makes them with
:func:`ort_session`, so thread settings are decided in one place; every graph runs with
ONNX Runtime's default optimisation, as in a user's own session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError
from .base import GraphFile, GraphInMemory, GraphRunner, RunSettings
from .onnx_files import CheckedGraph

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
    manifest is the caller's (``onnx_files.checked_graph``; every graph runner does it on activation).

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


def run_session(session, array: np.ndarray) -> np.ndarray:
    """The first output of a single-input session."""
    return session.run(None, {session.get_inputs()[0].name: array})[0]


class SessionFromGraph:
    """ONNX Runtime's loader: a checked graph to a session on ``provider``, the caller's host
    settings turned into ONNX Runtime's options (:func:`ort_session`: ``threads`` sizes the
    intra-op pool; a process shared with other runners gets no spinning)."""

    def __init__(self, provider: str, settings: RunSettings) -> None:
        self.provider, self.settings = provider, settings

    def __call__(self, graph: CheckedGraph):
        return ort_session(graph.model(), PROVIDERS[self.provider], self.settings.threads,
                           spinning=not self.settings.shares_process)


class OnnxRuntimeRunner(GraphRunner):
    """An ONNX graph on ONNX Runtime's CPU or CUDA execution provider.

    (ORT's TensorRT provider is not offered: the onnxruntime-gpu pin that ModelOpt needs
    cannot drive TensorRT 11 (docs/architecture.md); engines run through runtimes/tensorrt.py.)
    """

    runtime = "ONNX Runtime"

    def __init__(self, source: Path | GraphFile | GraphInMemory, settings: RunSettings = RunSettings(),
                 provider: str = "cpu") -> None:
        """``provider`` comes from the registry entry; ``settings`` from the caller."""
        if provider not in PROVIDERS:
            raise InputError(f"unknown ONNX Runtime provider '{provider}' (known: {', '.join(PROVIDERS)})")
        reason = self.unavailable(provider=provider)
        if reason is not None:
            raise DependencyError(reason)
        super().__init__(source, settings)
        self.provider = provider
        self.name = f"onnxruntime-{provider}"
        self.loader = SessionFromGraph(provider, settings)
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

    @classmethod
    def environment(cls, **_: object) -> dict:
        """What decides this runtime's results here besides the graph: its execution providers."""
        return {"providers": available_providers()}

    def load_impl(self, graph: CheckedGraph) -> tuple[tuple[int | None, ...], str]:
        self.session = self.loaded(graph)
        if PROVIDERS[self.provider] not in self.session.get_providers():
            self.session = None
            raise DependencyError(f"ONNX Runtime could not start {PROVIDERS[self.provider]} here")
        graph_input = self.session.get_inputs()[0]
        return tuple(d if isinstance(d, int) else None for d in graph_input.shape), graph_input.name

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_spec.name: batch})[0], dtype=np.float32)

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [output.name for output in self.session.get_outputs()]
        return {name: np.asarray(value, dtype=np.float32)
                for name, value in zip(names, self.session.run(None, {self.input_spec.name: batch}))}
