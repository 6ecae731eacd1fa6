"""TensorRT: engines built from the exported ONNX, described in a manifest, run only where valid.

Precision lives in the ONNX (TensorRT 11 removed weak typing): the fp32 engine
is built from ``model.onnx`` and the fp16 engine from ``model_fp16.onnx``, both
as strongly typed networks (TensorRT 10 gets the STRONGLY_TYPED flag, 11 needs
none). One optimisation profile spans the batch range; a timing cache persists
between builds. An engine runs only on the TensorRT version and GPU model that
built it, so its manifest records both and loading refuses a mismatch.
Where TensorRT or a GPU is missing, nothing is built and the manifest carries
the equivalent ``trtexec`` command instead.

Why our own builder and runner rather than Polygraphy's ``backend.trt`` (considered; it is
installed here with ModelOpt): both paths are untestable on the project's machines, so the
thinner one wins. Ours is one function and one class on the documented TensorRT 10/11 API.
Polygraphy 0.53's ``NetworkFromOnnxPath(strongly_typed=True)`` sets the STRONGLY_TYPED
creation flag, which TensorRT 11 no longer takes (its networks are always strongly typed),
so the version branch would remain ours anyway; and its ``TrtRunner`` allocates through its
own ctypes CUDA wrapper, a second allocator beside PyTorch's in the benchmark process, where
ours runs on PyTorch's CUDA memory and stream. What we keep regardless: the engine manifest
(TensorRT version, GPU, sha256) checked on load, which Polygraphy does not have.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import check_format, read_json, require_keys, sha256_file, utc_now, write_json
from ..errors import DependencyError, InputError, IntegrityError, VerificationError
from .base import GraphFile, InputSpec, Runner, RunSettings
from .onnx_files import checked_graph, graph_precision

ENGINE_FORMAT = "transmiter-deploy/tensorrt-engine"
FORMER_ENGINE_FORMATS = ("transmiter-tensorrt-engine",)  # before 0.2; still read
ENGINE_FORMAT_VERSION = 1


def tensorrt_available() -> str | None:
    """None when TensorRT engines can be built and run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def manifest_path(engine: Path) -> Path:
    return Path(engine).with_suffix(Path(engine).suffix + ".json")


def onnx_input(onnx_path: Path) -> tuple[str, list[int | None]]:
    """The graph's single input: its name and its shape (None for symbolic axes)."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX graph not found: {onnx_path}")
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise InputError(f"{onnx_path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from exc
    if len(graph.input) != 1:
        raise InputError(f"{onnx_path}: expected one graph input, found {len(graph.input)}")
    value = graph.input[0]
    return value.name, [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def profile_shapes(shape: list[int | None], profile: BatchProfile) -> dict[str, list[int]]:
    if any(d is None for d in shape[1:]):
        raise InputError(f"only the batch axis may be dynamic, got input shape {shape}")
    rest = [int(d) for d in shape[1:]]
    return {"min": [profile.min, *rest], "opt": [profile.opt, *rest], "max": [profile.max, *rest]}


def trtexec_command(onnx_path: Path, engine: Path, input_name: str, shapes: dict[str, list[int]],
                    workspace_mib: int, timing_cache: Path) -> str:
    dims = {key: "x".join(str(d) for d in value) for key, value in shapes.items()}
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine} --stronglyTyped "
            f"--minShapes={input_name}:{dims['min']} --optShapes={input_name}:{dims['opt']} "
            f"--maxShapes={input_name}:{dims['max']} --memPoolSize=workspace:{workspace_mib}M "
            f"--timingCacheFile={timing_cache}")


def gpu_identity() -> dict[str, str]:
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_engine_manifest(manifest: dict[str, Any], tensorrt_version: str, gpu: dict[str, str], where: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU model."""
    check_format(manifest, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, where, FORMER_ENGINE_FORMATS)
    require_keys(manifest, {"built": bool, "tensorrt_version": str, "gpu": dict, "input": dict, "onnx_sha256": str},
                 where)
    if not manifest["built"]:
        raise InputError(f"{where}: no engine was built here ({manifest.get('reason_not_built')}); "
                         "build it with the trtexec command in this manifest")
    if manifest["tensorrt_version"] != tensorrt_version:
        raise IntegrityError(f"{where}: engine built by TensorRT {manifest['tensorrt_version']}, this is "
                             f"TensorRT {tensorrt_version}; rebuild it here")
    built_for = manifest["gpu"]
    if (built_for.get("name"), built_for.get("compute_capability")) != (gpu["name"], gpu["compute_capability"]):
        raise IntegrityError(f"{where}: engine built for {built_for.get('name')} (sm {built_for.get('compute_capability')}), "
                             f"this GPU is {gpu['name']} (sm {gpu['compute_capability']}); rebuild it here")


def build_engine(onnx_path: Path, engine: Path, profile: BatchProfile = BatchProfile(), workspace_mib: int = 4096,
                 timing_cache: Path | None = None, log=print) -> dict[str, Any]:
    """Build a strongly typed engine; without TensorRT or a GPU, write the manifest with the
    equivalent trtexec command and raise DependencyError (exit status 3)."""
    onnx_path, engine = Path(onnx_path), Path(engine)
    input_name, shape = onnx_input(onnx_path)
    # TensorRT's parser reads a graph's external data from the graph's directory, unchecked: the
    # checks every runtime needs run first (data files against the export manifest, a Q/DQ
    # graph's scales, without which TensorRT would build an engine that returns garbage)
    checked = checked_graph(onnx_path)
    data_files, graph_kind = checked.data_files, checked.precision
    shapes = profile_shapes(shape, profile)
    timing_cache = Path(timing_cache) if timing_cache else engine.parent / "timing.cache"
    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "onnx": str(onnx_path), "onnx_sha256": sha256_file(onnx_path), "precision": graph_kind,
        **({"onnx_external_data": {path.name: sha256_file(path) for path in data_files}} if data_files else {}),
        "input": {"name": input_name, "shapes": shapes}, "profile": asdict(profile),
        "workspace_mib": workspace_mib, "strongly_typed": True,
        "trtexec": trtexec_command(onnx_path, engine, input_name, shapes, workspace_mib, timing_cache),
        "created": utc_now(),
    }
    reason = tensorrt_available()
    engine.parent.mkdir(parents=True, exist_ok=True)
    if reason is not None:
        write_json(manifest_path(engine), {**manifest, "built": False, "reason_not_built": reason,
                                           "tensorrt_version": "", "gpu": {}})
        raise DependencyError(f"{reason}: no engine built; the equivalent trtexec command is in "
                              f"{manifest_path(engine)}")
    plan, version = _build_plan(onnx_path, input_name, shapes, workspace_mib, timing_cache, log)
    staging = engine.with_name(f".{engine.name}.partial")
    staging.write_bytes(plan)
    os.replace(staging, engine)
    manifest.update({"built": True, "tensorrt_version": version, "gpu": gpu_identity(),
                     "engine_sha256": sha256_file(engine)})
    write_json(manifest_path(engine), manifest)
    return manifest


def _build_plan(onnx_path: Path, input_name: str, shapes: dict[str, list[int]], workspace_mib: int,
                timing_cache: Path, log) -> tuple[bytes, str]:  # pragma: no cover - needs TensorRT and a GPU
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if int(trt.__version__.split(".")[0]) >= 11:
        network = builder.create_network()  # always strongly typed; no creation flags
    else:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): given the graph's path, the parser resolves external data
    # locations against the graph's directory (TensorRT 10 and 11); parse(bytes) finds them only
    # through its ``path`` argument, and holds a second copy of the graph in memory
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VerificationError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(optimisation)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building TensorRT {trt.__version__} engine from {onnx_path.name} (batch {shapes['min'][0]}..{shapes['max'][0]})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise VerificationError(f"TensorRT failed to build an engine from {onnx_path}")
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(plan), trt.__version__


def engine_path(graph: Path, compiled_dir: Path) -> Path:
    """Where the engine of ``graph`` lives: ``<compiled_dir>/<graph stem>.engine`` (an export's
    ``engines/model_fp16.engine``)."""
    return Path(compiled_dir) / f"{Path(graph).stem}.engine"


class EngineFromGraph:
    """TensorRT's loader: the engine of an ONNX graph, from the caller's ``compiled_dir``
    (an export's engine step built it there), or built there first over batches
    1..``max_batch`` (a benchmark's engines); or an engine file given directly."""

    def __init__(self, source: Path | GraphFile, settings: RunSettings) -> None:
        path = source.path if isinstance(source, GraphFile) else Path(source)
        if path.suffix == ".onnx":
            if settings.compiled_dir is None:
                raise InputError(f"TensorRT runs engines: say where the engine of {path.name} is or goes "
                                 "(RunSettings.compiled_dir)")
            self.graph, self.engine = path, engine_path(path, settings.compiled_dir)
        else:
            self.graph, self.engine = None, path
        self.max_batch = settings.max_batch

    def __call__(self) -> Path:  # pragma: no cover - needs TensorRT and a GPU
        if not self.engine.is_file() and self.graph is not None:
            batch = self.max_batch or BatchProfile().max
            build_engine(self.graph, self.engine, BatchProfile(1, batch, batch), log=lambda _: None)
        if not manifest_path(self.engine).is_file():
            raise InputError(f"TensorRT engine manifest not found: {manifest_path(self.engine)}")
        return self.engine


class TensorRTRunner(Runner):
    """Runs an engine through the name-based tensor API (set_input_shape, set_tensor_address,
    execute_async_v3) on PyTorch-allocated CUDA memory. ``source``: an exported ONNX graph
    (its engine found or built by :class:`EngineFromGraph`) or an engine file. Constructing
    loads nothing; ``activate`` reads and checks the engine's manifest, then deserialises it."""

    def __init__(self, source: Path | GraphFile, settings: RunSettings = RunSettings()) -> None:
        super().__init__()
        reason = tensorrt_available()
        if reason is not None:
            raise DependencyError(f"cannot run TensorRT engines here: {reason}")
        self.loader = EngineFromGraph(source, settings)
        self.name, self.graph = "tensorrt", self.loader.engine.name
        if isinstance(source, GraphFile) and source.precision:
            self.precision = source.precision

    @classmethod
    def unavailable(cls, **_: object) -> str | None:
        return tensorrt_available()

    def _read_manifest(self) -> None:  # pragma: no cover - needs TensorRT and a GPU
        self.engine_path = self.loader()
        self.manifest = read_json(manifest_path(self.engine_path), "engine manifest")
        check_format(self.manifest, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, str(manifest_path(self.engine_path)),
                     FORMER_ENGINE_FORMATS)
        shapes = self.manifest["input"]["shapes"]
        self.input_spec = InputSpec(self.manifest["input"]["name"], (None, *shapes["max"][1:]),
                                    min_batch=shapes["min"][0], max_batch=shapes["max"][0])
        # engines built before the manifest recorded it: the precision of the graph they came from
        self.precision = self.manifest.get("precision") or graph_precision(Path(self.manifest["onnx"]))

    def activate_impl(self) -> None:  # pragma: no cover - needs TensorRT and a GPU
        import tensorrt as trt

        self._read_manifest()
        check_engine_manifest(self.manifest, trt.__version__, gpu_identity(), str(manifest_path(self.engine_path)))
        if sha256_file(self.engine_path) != self.manifest.get("engine_sha256"):
            raise IntegrityError(f"engine {self.engine_path} does not match the sha256 in its manifest")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise IntegrityError(f"TensorRT cannot deserialise {self.engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        # every output needs an address before a run (a task bank's engine has one per task)
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def deactivate_impl(self) -> None:  # pragma: no cover - needs TensorRT and a GPU
        self.context = self.engine = self.runtime = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - needs TensorRT and a GPU
        return next(iter(self.outputs_impl(batch).values()))

    def outputs_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - needs TensorRT and a GPU
        import torch

        pixels = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_spec.name, tuple(batch.shape))
        self.context.set_tensor_address(self.input_spec.name, pixels.data_ptr())
        outputs = {}
        for name in self.output_names:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise VerificationError("TensorRT execution failed")
        stream.synchronize()
        return {name: output.cpu().numpy() for name, output in outputs.items()}
