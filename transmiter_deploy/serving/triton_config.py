"""Triton model configurations: what each model of a repository is (:class:`ModelSpec`), its
``config.pbtxt`` text, and the checks every written repository passes.

Two kinds of check. Triton's own model-config protobuf (``tritonclient.grpc.model_config_pb2``,
read with ``google.protobuf.text_format``) refuses a misspelt field or a bad enum, as the server
would; it cannot see the wiring, so :func:`check_wiring` does: every ensemble step names a model
of the repository, each step's tensors exist on the model it names and connect (name, type and
dims) to the ensemble's inputs or an earlier step's outputs, every ensemble output is produced,
no ensemble batches more than a model inside it (Triton refuses that at load),
and every label file has one line per class of its output. :func:`check_repository` adds what
needs the folders: each version a config serves has its folder and model file, and an ensemble
step pinned to a version (generations: :mod:`.triton_generations`) names one its model serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import DependencyError, InputError

CONFIG = "config.pbtxt"
MARKER = "transmiter-triton.json"  # the repository's record: ours, what it holds, every file's sha256
FORMAT = "transmiter-deploy/triton-repository"
FORMAT_VERSION = 1
VERSION = "1"  # the version folder of an export's first generation (generation N is folder N)
SERVE_EXTRA = "pip install 'transmiter-deploy[serve]'"

# manifest dtypes -> Triton's
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "string": "TYPE_STRING"}
# names written into configs and paths: Triton's model names are directory names, and a quote or
# a newline would need escaping in the text format; the toolkit's own names never need it
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, Triton type and dims after the batch axis; an output with
    class names gets a label file (Triton's classification extension answers with them)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    labels: tuple[str, ...] | None = None

    @property
    def label_file(self) -> str | None:
        return f"labels_{self.name}.txt" if self.labels is not None else None


@dataclass(frozen=True)
class Step:
    """An ensemble step: a model, its inputs and outputs mapped to the ensemble's tensors."""

    model: str
    input_map: dict[str, str]  # the step model's input -> the ensemble tensor it reads
    output_map: dict[str, str]  # the step model's output -> the ensemble tensor it writes


@dataclass
class ModelSpec:
    """A model of the repository, enough to write its directory and its ``config.pbtxt``."""

    name: str
    kind: str  # "python", "onnxruntime", "tensorrt" or "ensemble"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    instance_kind: str | None = None  # "KIND_CPU" or "KIND_GPU"; None for an ensemble
    model_filename: str | None = None  # the file Triton loads from the version directory
    files: dict[str, Path | bytes] = field(default_factory=dict)  # version dir's file -> source (or content)
    parameters: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or len(name) > 128:
        raise InputError(f"{what} {name!r} cannot name a Triton model or tensor (letters, digits, '_', '.', '-'; "
                         f"at most 128 characters)")
    return name


def _quoted(text: str) -> str:
    if any(ch in text for ch in '"\\\n\r') or not text.isprintable():
        raise InputError(f"{text!r} cannot be written in a Triton config")
    return f'"{text}"'


def _tensor_text(tensor: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in tensor.dims)
    label = f"\n    label_filename: {_quoted(tensor.label_file)}" if tensor.label_file else ""
    return (f"  {{\n    name: {_quoted(tensor.name)}\n    data_type: {tensor.dtype}\n    dims: [ {dims} ]{label}\n  }}")


def _map_text(key: str, pairs: dict[str, str]) -> str:
    return "".join(f"\n      {key} {{ key: {_quoted(k)} value: {_quoted(v)} }}" for k, v in pairs.items())


def config_text(spec: ModelSpec) -> str:
    """``spec`` as Triton's text format (the protobuf checks parse it back)."""
    lines = [f"name: {_quoted(spec.name)}"]
    if spec.kind == "ensemble":
        lines.append('platform: "ensemble"')
    else:
        lines.append(f"backend: {_quoted(spec.kind)}")
    lines.append(f"max_batch_size: {spec.max_batch_size}")
    if spec.model_filename:
        lines.append(f"default_model_filename: {_quoted(spec.model_filename)}")
    lines.append("input [\n" + ",\n".join(_tensor_text(t) for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_text(t) for t in spec.outputs) + "\n]")
    if spec.kind == "ensemble":
        steps = ",\n".join(f"    {{\n      model_name: {_quoted(s.model)}\n      model_version: -1"
                           f"{_map_text('input_map', s.input_map)}{_map_text('output_map', s.output_map)}\n    }}"
                           for s in spec.steps)
        lines.append("ensemble_scheduling {\n  step [\n" + steps + "\n  ]\n}")
    else:
        # Batching is the models' own: an ensemble schedules its steps and never batches itself.
        # No preferred_batch_size: every graph takes any batch up to the maximum in one profile, so
        # the batcher should send what is queued at once; no queue delay, so a lone request waits
        # for nothing (under load, requests queue while the model runs and batch by themselves).
        lines.append("dynamic_batching { }")
        lines.append(f"instance_group [\n  {{\n    kind: {spec.instance_kind}\n    count: 1\n  }}\n]")
    for key, value in spec.parameters.items():
        lines.append(f"parameters {{\n  key: {_quoted(key)}\n  value: {{ string_value: {_quoted(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def serving_config(base: str, versions: Sequence[int] | None = None, pin: int | None = None) -> str:
    """``base`` (:func:`config_text`'s) serving ``versions`` (``version_policy { specific }``) with
    its ensemble steps pinned to version ``pin``: the text forms a generation's config takes on
    disk. None leaves Triton's defaults (the latest version; a step's latest), as ``base`` has them."""
    lines = base.split("\n")
    if pin is not None:
        lines = [line.replace("model_version: -1", f"model_version: {int(pin)}")
                 if line.strip() == "model_version: -1" else line for line in lines]
    if versions is not None:
        at = next(i for i, line in enumerate(lines) if line.startswith("max_batch_size:")) + 1
        listed = ", ".join(str(int(v)) for v in sorted(set(versions)))
        lines.insert(at, f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}")
    return "\n".join(lines)


def policy_of(config: Any) -> tuple[int, ...] | None:
    """The versions a parsed config names in ``version_policy { specific }`` (None: no such policy)."""
    if config.HasField("version_policy") and config.version_policy.WhichOneof("policy_choice") == "specific":
        return tuple(sorted(config.version_policy.specific.versions))
    return None


def served_versions(config: Any, model_dir: Path) -> list[int]:
    """The versions Triton loads for a parsed config from ``model_dir``'s numeric folders."""
    specific = policy_of(config)
    if specific is not None:
        return list(specific)
    folders = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if config.HasField("version_policy") and config.version_policy.WhichOneof("policy_choice") == "all":
        return folders
    count = config.version_policy.latest.num_versions if config.HasField("version_policy") else 1
    return folders[-max(count, 1):] if folders else []


def model_config_proto():
    """Triton's ModelConfig message class, or DependencyError naming the extra that installs it."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise DependencyError(f"Triton's model-config protobuf is not installed ({exc}): {SERVE_EXTRA}") from exc
    return model_config_pb2.ModelConfig


def parse_config(text: str, where: str) -> Any:
    """``text`` read by Triton's own protobuf; InputError naming ``where`` when Triton would not."""
    from google.protobuf import text_format

    message = model_config_proto()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise InputError(f"{where}: not a Triton model config ({exc})") from exc
    return message


def read_configs(repository: Path) -> dict[str, Any]:
    """Every model's ``config.pbtxt`` under ``repository``, parsed, by model name; InputError when
    a config's name is not its directory's (Triton would not load it)."""
    configs = {}
    for path in sorted(Path(repository).glob(f"*/{CONFIG}")):
        config = parse_config(path.read_text(encoding="utf-8"), str(path))
        if config.name != path.parent.name:
            raise InputError(f"{path}: names model '{config.name}', but its directory is '{path.parent.name}'")
        configs[config.name] = config
    if not configs:
        raise InputError(f"{repository} holds no model ({CONFIG} in a folder of its own)")
    return configs


def check_repository(repository: Path) -> dict[str, Any]:
    """Every config parsed by Triton's protobuf and the wiring checked; the parsed configs."""
    repository = Path(repository)
    configs = read_configs(repository)
    served = {}
    for name, config in configs.items():
        where = str(repository / name / CONFIG)
        served[name] = served_versions(config, repository / name)
        for version in served[name] or [VERSION]:
            if not (repository / name / str(version)).is_dir():
                raise InputError(f"{where}: no version directory {version}/")
        _check_files(repository / name, config, where, served[name])
    for name, config in configs.items():
        if config.platform == "ensemble":
            where = str(repository / name / CONFIG)
            check_wiring(config, configs, where)
            _check_pins(config, served, where)
    return configs


def _check_pins(ensemble: Any, served: dict[str, list[int]], where: str) -> None:
    """A step pinned to a version names one its model serves (Triton refuses the ensemble's load
    otherwise, and a refused ensemble is unloaded)."""
    for index, step in enumerate(ensemble.ensemble_scheduling.step):
        versions = served.get(step.model_name, [])
        if step.model_version > 0 and step.model_version not in versions:
            raise InputError(f"{where}: step {index} ({step.model_name}) is pinned to version {step.model_version}, "
                             f"which that model does not serve (it serves {versions})")


def _check_files(model_dir: Path, config: Any, where: str, versions: list[int]) -> None:
    """The model's file is in each version directory it serves, and each label file has one line
    per class."""
    if config.platform != "ensemble":
        filename = config.default_model_filename or {"python": "model.py", "onnxruntime": "model.onnx",
                                                     "tensorrt": "model.plan"}.get(config.backend, "")
        for version in versions:
            if not (model_dir / str(version) / filename).is_file():
                raise InputError(f"{where}: its model file {version}/{filename} is missing")
    for output in config.output:
        if not output.label_filename:
            continue
        path = model_dir / output.label_filename
        if not path.is_file():
            raise InputError(f"{where}: label file {output.label_filename} of output '{output.name}' is missing")
        lines = path.read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines and lines[-1] == "" else lines
        width = output.dims[-1] if len(output.dims) else 0
        if len(lines) != width:
            raise InputError(f"{path}: {len(lines)} labels for output '{output.name}' of width {width}")


def _tensors(items: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {item.name: (item.data_type, tuple(item.dims)) for item in items}


def check_wiring(ensemble: Any, configs: dict[str, Any], where: str) -> None:
    """The ensemble's steps connect: each tensor a step reads exists (an ensemble input or an
    earlier step's output) with the type and dims the step's model declares; each output the
    ensemble declares is written by exactly one step, as declared."""
    available = _tensors(ensemble.input)
    written: set[str] = set()
    for index, step in enumerate(ensemble.ensemble_scheduling.step):
        here = f"{where}: step {index} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            raise InputError(f"{here}: no model '{step.model_name}' in the repository")
        if model.max_batch_size < ensemble.max_batch_size:
            raise InputError(f"{here}: max_batch_size {model.max_batch_size} is below the ensemble's "
                             f"{ensemble.max_batch_size}")
        inputs, outputs = _tensors(model.input), _tensors(model.output)
        if set(step.input_map) != set(inputs):
            raise InputError(f"{here}: maps inputs {sorted(step.input_map)}, the model takes {sorted(inputs)}")
        for model_input, tensor in step.input_map.items():
            if tensor not in available:
                raise InputError(f"{here}: reads '{tensor}', which no ensemble input or earlier step provides")
            if not _compatible(available[tensor], inputs[model_input]):
                raise InputError(f"{here}: '{tensor}' is {_describe(available[tensor])}, input '{model_input}' "
                                 f"takes {_describe(inputs[model_input])}")
        for model_output, tensor in step.output_map.items():
            if model_output not in outputs:
                raise InputError(f"{here}: the model has no output '{model_output}'")
            if tensor in available:
                raise InputError(f"{here}: '{tensor}' is written twice")
            available[tensor] = outputs[model_output]
            written.add(tensor)
    for name, described in _tensors(ensemble.output).items():
        if name not in written:
            raise InputError(f"{where}: output '{name}' is written by no step")
        if not _compatible(available[name], described):
            raise InputError(f"{where}: output '{name}' is declared {_describe(described)}, its step writes "
                             f"{_describe(available[name])}")


def _compatible(a: tuple[int, tuple[int, ...]], b: tuple[int, tuple[int, ...]]) -> bool:
    """One type and rank, each dim equal or -1 (any size) on either side: Triton's own rule for the
    tensors an ensemble passes (a model serving two generations of other sizes declares -1 there)."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(x == y or -1 in (x, y) for x, y in zip(a[1], b[1]))


def _describe(tensor: tuple[int, tuple[int, ...]]) -> str:
    from tritonclient.grpc import model_config_pb2

    return f"{model_config_pb2.DataType.Name(tensor[0])} {list(tensor[1])}"
