"""The runtimes and precisions the toolkit knows, as data.

Everything that lists runtimes or precisions derives its list from here: the CLI's
choices, the recipe schema, the export's conversion and validation loops, the
benchmark's runtime list and the comparator's tolerances. Importing this module
imports neither torch nor any runtime: the code behind an entry is named by a
``"module:attribute"`` string and resolved only when used.

Adding a runtime: one module under ``runtimes/`` with a :class:`~.base.Runner`
subclass, and one :data:`RUNTIMES` entry. Adding a precision: one converter module
under ``deploy/precisions/`` and one :data:`PRECISIONS` entry.
(``tests/test_registry.py`` fails until each entry has its code and its tests.)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

GRAPH_LOADS = ("module", "onnx", "engine")


def resolve(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Precision:
    """One numeric precision of an exported graph."""

    name: str  # as recipes and the CLI spell it
    suffix: str  # of the graph files: model{suffix}.onnx, head{suffix}.onnx
    manifest_name: str  # what the export manifest records as each file's precision
    max_abs: float | None  # tolerance on logits against the fp32 reference (None: judged by top-1 alone)
    top1: float  # minimum top-1 agreement with the fp32 reference
    needs_calibration: bool  # the converter must be given real inputs (else they only help)
    converter: str  # "module:function" that makes this precision's graph (in memory)
    # "module:function" that writes it instead, never holding its tensors: what exports use when set
    # (fp32_path, out_path, inputs, fp32_nodes, external_data_threshold) -> data files written
    file_converter: str | None = None
    requires: tuple[str, ...] = ()  # modules the converter imports
    install: str = ""  # what to install when they are missing
    gates_export: bool = True  # a failed parity check of the pixels graph fails the export
    by_default: bool = True  # exported when a recipe or the CLI names no precisions
    skip_if_missing: bool = True  # a recipe asking for it where the converter cannot run: skip (else exit 3)
    # calibrated precisions are gated on labelled images too: base, novel and HM accuracy each
    # within this many points of the fp32 graph's (None: no accuracy gate)
    accuracy_points: float | None = None
    # ... and at least this share of fp32's accuracy (MLPerf's rule for quantised models: 99%)
    accuracy_relative: float | None = None
    qdq: bool = False  # explicitly quantised (QuantizeLinear/DequantizeLinear): scales are checked on load

    @property
    def reference(self) -> bool:
        """fp32 is what every other precision is checked against."""
        return self.name == REFERENCE_PRECISION

    def graph_name(self, stem: str) -> str:
        return f"{stem}{self.suffix}.onnx"

    def missing(self) -> str | None:
        """None when the converter can run here, else what to install."""
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        return f"{', '.join(absent)} is not installed ({self.install})" if absent else None

    def tolerance(self) -> dict[str, float | None]:
        return {"max_abs": self.max_abs, "top1": self.top1}


@dataclass(frozen=True)
class Runtime:
    """One way of running a graph: a runner class and the options it is built with."""

    name: str  # e.g. onnxruntime-cpu, as the benchmark and validation tables name it
    family: str  # the recipe's name for it (``runtimes: [onnxruntime]``)
    runner: str  # "module:Class", a subclass of runtimes.base.Runner
    loads: str  # what the runner is built from: a torch "module", an "onnx" graph, an "engine" compiled from one
    device: str  # "cpu" or "cuda"
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the runner
    includes_copies: bool = False  # a call's time includes host <-> device copies
    reference: bool = False  # the runtime every other is compared against
    verifies: bool = False  # the graph runtime exports check every graph they write on (deploy/parity.py)
    # arithmetic below the graph's precision (OpenVINO's bf16 on a fp32 graph): its results are
    # judged by that arithmetic's tolerance (ARITHMETIC_TOLERANCES) where it is looser
    arithmetic: str | None = None

    def runner_class(self) -> type:
        return resolve(self.runner)

    def tolerance(self, precision_name: str) -> dict[str, float | None]:
        """What this runtime's outputs on a ``precision_name`` graph are judged by: the precision's
        tolerance, loosened by the runtime's own arithmetic where it has one."""
        tolerance = precision(precision_name).tolerance()
        if self.arithmetic is None:
            return tolerance
        own = ARITHMETIC_TOLERANCES[self.arithmetic]
        return {"max_abs": None if own["max_abs"] is None or tolerance["max_abs"] is None
                else max(own["max_abs"], tolerance["max_abs"]),
                "top1": min(own["top1"], tolerance["top1"])}

    def create(self, source: Any, settings: Any = None, **kwargs: Any):
        """A runner (not yet active) over ``source``: a torch module or a zero-argument builder of
        one (``loads == "module"``, with ``input_spec=``), an ONNX graph (a path or a
        ``base.GraphFile``) for the others. ``settings``: the caller's ``base.RunSettings`` (threads,
        a shared process, the largest batch, where compiled graphs go), which the runtime's loader
        turns into its own options; the entry's ``options`` are the runtime's, never the caller's."""
        cls = self.runner_class()
        if settings is not None:
            return cls(source, settings, **dict(self.options), **kwargs)
        return cls(source, **dict(self.options), **kwargs)

    def environment(self) -> dict:
        """What decides this runtime's results here besides what it runs (the runner's
        ``environment``: e.g. ONNX Runtime's providers)."""
        return self.runner_class().environment(**dict(self.options))

    def unavailable(self) -> str | None:
        """None when this runtime can run here, else why not (a missing GPU named first)."""
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "no CUDA GPU is visible"
        return self.runner_class().unavailable(**dict(self.options))


REFERENCE_PRECISION = "fp32"

PRECISIONS: dict[str, Precision] = {precision.name: precision for precision in (
    Precision("fp32", "", "fp32", max_abs=1e-4, top1=1.0, needs_calibration=False,
              converter="transmiter_deploy.deploy.onnx_export:to_onnx"),
    # mixed fp16: logits reach ~100 (CLIP's logit scale), so absolute error is judged by top-1;
    # the pixels graph on ONNX Runtime CPU is reported, not gated (TensorRT is its runtime)
    Precision("fp16", "_fp16", "mixed-fp16", max_abs=None, top1=0.995, needs_calibration=False,
              converter="transmiter_deploy.deploy.precisions.fp16:convert", requires=("onnxconverter_common",),
              file_converter="transmiter_deploy.deploy.precisions.fp16:convert_to_file",
              install="pip install 'transmiter-deploy[fp16]'", gates_export=False),
    # int8 Q/DQ (ModelOpt PTQ) for edge CPUs and TensorRT's explicit quantisation; calibrated on the
    # recipe's own images and gated on its labelled ones (pipeline/export.py), opt-in. The accuracy
    # gate decides (deploy/gate.py): agreement with PyTorch on the few parity images is reported, as
    # one near-tie flipped there would otherwise refuse a graph whose accuracy the gate accepts
    Precision("int8", "_int8", "int8-qdq", max_abs=None, top1=0.99, needs_calibration=True,
              converter="transmiter_deploy.deploy.precisions.int8:convert", requires=("modelopt",),
              install="pip install 'transmiter-deploy[int8]'", by_default=False, skip_if_missing=False,
              gates_export=False, accuracy_points=1.0, accuracy_relative=0.99, qdq=True),
)}

RUNTIMES: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    Runtime("pytorch-cpu", "pytorch", "transmiter_deploy.runtimes.pytorch:TorchRunner", "module", "cpu",
            (("device", "cpu"),), reference=True),
    Runtime("pytorch-cuda", "pytorch", "transmiter_deploy.runtimes.pytorch:TorchRunner", "module", "cuda",
            (("device", "cuda"),)),
    Runtime("pytorch-cuda-graphs", "pytorch", "transmiter_deploy.runtimes.pytorch:TorchRunner", "module", "cuda",
            (("device", "cuda"), ("cuda_graphs", True))),
    Runtime("onnxruntime-cpu", "onnxruntime", "transmiter_deploy.runtimes.onnxruntime:OnnxRuntimeRunner", "onnx",
            "cpu", (("provider", "cpu"),), verifies=True),
    Runtime("onnxruntime-cuda", "onnxruntime", "transmiter_deploy.runtimes.onnxruntime:OnnxRuntimeRunner", "onnx",
            "cuda", (("provider", "cuda"),), includes_copies=True),
    Runtime("tensorrt", "tensorrt", "transmiter_deploy.runtimes.tensorrt:TensorRTRunner", "engine", "cuda",
            includes_copies=True),
    # OpenVINO's CPU plugin at fp32 (its own default on a bf16 CPU computes in bf16: never implicit)
    Runtime("openvino-cpu", "openvino", "transmiter_deploy.runtimes.openvino:OpenVinoRunner", "onnx", "cpu",
            (("inference_precision", "f32"),)),
    # ... and computing in bf16 where the CPU has it (AVX-512 BF16, AMX): faster, judged by top-1;
    # a family of its own, so that a recipe asks for it by name (`runtimes: [openvino-bf16]`)
    Runtime("openvino-cpu-bf16", "openvino-bf16", "transmiter_deploy.runtimes.openvino:OpenVinoRunner", "onnx",
            "cpu", (("inference_precision", "bf16"),), arithmetic="bf16"),
)}

# Arithmetic a runtime may compute in below the graph's precision (Runtime.arithmetic): logits
# lose about three significant digits in bf16 (8 bits of mantissa), so only top-1 is judged
ARITHMETIC_TOLERANCES: dict[str, dict[str, float | None]] = {"bf16": {"max_abs": None, "top1": 0.99}}


def precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise InputError(f"unknown precision '{name}' (known: {', '.join(PRECISIONS)})")
    return PRECISIONS[name]


def precision_from_manifest(manifest_name: str) -> Precision:
    """The precision an export manifest records for a file (``fp32``, ``mixed-fp16``, ...)."""
    for entry in PRECISIONS.values():
        if manifest_name in (entry.manifest_name, entry.name):
            return entry
    raise InputError(f"unknown precision '{manifest_name}' in a manifest (known: "
                     f"{', '.join(p.manifest_name for p in PRECISIONS.values())})")


def default_precisions() -> tuple[str, ...]:
    return tuple(name for name, entry in PRECISIONS.items() if entry.by_default)


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime '{name}' (known: {', '.join(RUNTIMES)})")
    return RUNTIMES[name]


def families() -> tuple[str, ...]:
    """The runtime names recipes use, in registry order."""
    return tuple(dict.fromkeys(entry.family for entry in RUNTIMES.values()))


def default_families() -> tuple[str, ...]:
    """What a recipe that names no runtimes validates on: every family with a runtime at the graph's
    own arithmetic (a reduced one, OpenVINO's bf16, is asked for by name)."""
    return tuple(dict.fromkeys(entry.family for entry in RUNTIMES.values() if entry.arithmetic is None))


def runtime_names(device: str | None = None) -> tuple[str, ...]:
    return tuple(name for name, entry in RUNTIMES.items() if device is None or entry.device == device)


def reference_runtime() -> Runtime:
    return next(entry for entry in RUNTIMES.values() if entry.reference)


def verification_runtime() -> Runtime:
    """The graph runtime an export checks every graph it writes on (ONNX Runtime on the CPU:
    present wherever the toolkit installs, and what the load probe checks graphs against)."""
    return next(entry for entry in RUNTIMES.values() if entry.verifies)
