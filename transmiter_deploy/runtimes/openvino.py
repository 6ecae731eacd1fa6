"""OpenVINO: an export's ONNX graphs on OpenVINO's CPU plugin, its loader and the runner over it.

OpenVINO reads the toolkit's fp32, fp16 and Q/DQ int8 graphs as exported (a graph with
external data from its path, the data file beside it). The inference precision is the
registry entry's: ``f32`` keeps fp32 parity (judged by the fp32 tolerance); OpenVINO's own
default on a CPU with bf16 is to compute in bf16, which is faster and not at parity, so it is
never left implicit. ``RunSettings.threads`` sets ``INFERENCE_NUM_THREADS``; one stream at
latency hint, as a single caller runs it.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..errors import DependencyError, InputError
from .base import GraphRunner, RunSettings
from .onnx_files import CheckedGraph

INSTALL = "pip install 'transmiter-deploy[openvino]'"
PRECISION_HINTS = ("f32", "bf16")  # OpenVINO's INFERENCE_PRECISION_HINT values offered


def openvino_unavailable(inference_precision: str = "f32") -> str | None:
    """None when OpenVINO's CPU plugin can run at ``inference_precision`` here, else why not."""
    if importlib.util.find_spec("openvino") is None:
        return f"OpenVINO is not installed ({INSTALL})"
    if inference_precision not in PRECISION_HINTS:
        return f"unknown OpenVINO inference precision '{inference_precision}' (known: {', '.join(PRECISION_HINTS)})"
    if inference_precision == "bf16":
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"this CPU has no bf16 arithmetic for OpenVINO (its capabilities: {', '.join(capabilities)})"
    return None


class CompiledModelFromGraph:
    """OpenVINO's loader: a checked graph read and compiled for the CPU plugin, with the entry's
    inference precision and the caller's thread count."""

    def __init__(self, inference_precision: str, settings: RunSettings) -> None:
        self.inference_precision, self.settings = inference_precision, settings

    def __call__(self, graph: CheckedGraph):
        import openvino as ov

        core = ov.Core()
        if graph.serialized is not None:
            # an ONNX model in memory: OpenVINO's ONNX frontend reads it from bytes (every tensor inline)
            model = core.read_model(graph.serialized)
        else:
            model = core.read_model(str(graph.path))
        config = {"INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": "1"}
        if self.settings.threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self.settings.threads)
        return core.compile_model(model, "CPU", config)


class OpenVinoRunner(GraphRunner):
    """An ONNX graph on OpenVINO's CPU plugin (one infer request, reused between calls)."""

    runtime = "OpenVINO"

    def __init__(self, source, settings: RunSettings = RunSettings(), inference_precision: str = "f32") -> None:
        """``inference_precision`` comes from the registry entry; ``settings`` from the caller."""
        if inference_precision not in PRECISION_HINTS:
            raise InputError(f"unknown OpenVINO inference precision '{inference_precision}' "
                             f"(known: {', '.join(PRECISION_HINTS)})")
        reason = self.unavailable(inference_precision=inference_precision)
        if reason is not None:
            raise DependencyError(reason)
        super().__init__(source, settings)
        self.name = "openvino-cpu" if inference_precision == "f32" else f"openvino-cpu-{inference_precision}"
        self.loader = CompiledModelFromGraph(inference_precision, settings)
        self.compiled = self.request = None

    @classmethod
    def unavailable(cls, inference_precision: str = "f32", **_: object) -> str | None:
        return openvino_unavailable(inference_precision)

    @classmethod
    def environment(cls, inference_precision: str = "f32", **_: object) -> dict:
        """What decides this runtime's results here besides the graph: its version and precision."""
        import openvino as ov

        return {"openvino": ov.__version__, "inference_precision": inference_precision}

    def load_impl(self, graph: CheckedGraph) -> tuple[tuple[int | None, ...], str]:
        self.compiled = self.loaded(graph)
        self.request = self.compiled.create_infer_request()
        self.output_names = _onnx_output_names(self.compiled.outputs, graph)
        graph_input = self.compiled.inputs[0]
        shape = tuple(d.get_length() if d.is_static else None for d in graph_input.get_partial_shape())
        return shape, graph_input.get_any_name()

    def deactivate_impl(self) -> None:
        self.compiled = self.request = self.output_names = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.outputs_impl(batch).values()))

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({0: batch})
        return {name: np.array(results[output], dtype=np.float32, copy=True)
                for name, output in zip(self.output_names, self.compiled.outputs)}


def _onnx_output_names(outputs, graph: CheckedGraph) -> list[str]:
    """Each compiled output under the ONNX graph's own name for it. OpenVINO gives a tensor all the
    names it carries (a task bank's ``logits_<task>`` is also its head's inner tensor name) and
    ``get_any_name`` picks any of them; the graph's output names are what callers ask for."""
    wanted = graph.outputs
    if not wanted and graph.serialized is not None:
        import onnx

        wanted = tuple(output.name for output in onnx.load_from_string(graph.serialized).graph.output)
    names = []
    for output in outputs:
        matches = sorted(set(output.get_names()) & set(wanted))
        names.append(matches[0] if len(matches) == 1 else output.get_any_name())
    return names
