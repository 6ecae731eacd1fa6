"""Export recipes: one YAML file names everything `transmiter export` needs.

A recipe is validated completely before anything runs: unknown keys (with
the closest known key suggested), wrong types, missing files and unknown
model names are reported in one line that names the key. Every path a recipe
names (a ``Path`` field of the schema, and ``head.templates`` when it names a
file) is resolved against the recipe file's directory when the recipe is read,
into an absolute path, and only that path is used afterwards: the check and the
export read the same file whatever the working directory. The schema, with
defaults, is documented in ``docs/recipes.md``; ``export/recipes/`` holds examples.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..method.device import DEVICE_HELP
from ..method.extraction import ExtractionSettings
from ..method.plus import PlusSettings
from ..runtimes import registry
from .teacher_specs import (LOGITS_FILE_SUFFIXES, LogitsTeacher, OnnxTeacher, TeacherPreprocess, check_preprocess,
                            images_path)

TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # as deploy/bank.py reads them back

# A recipe is a few hundred bytes, four levels deep: these bounds refuse, in one line, what no
# recipe needs before PyYAML's recursive composer and our validation walk it.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_NODES = 100_000

PRECISIONS = tuple(registry.PRECISIONS)  # what export.precisions may name
RUNTIME_FAMILIES = registry.families()  # what `runtimes:` may name


class RecipeError(InputError):
    """A recipe that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class ModelRef:
    """An open_clip architecture and where its weights come from (exactly one source)."""

    name: str
    pretrained: str | None = None  # open_clip tag, read from the Hugging Face cache
    checkpoint: Path | None = None  # local .safetensors
    demo_weights: str | None = None  # a model of the shipped demo world, e.g. TM-Demo-Source
    init_seed: int | None = None  # random weights: shapes and speed only


Teacher = ModelRef | OnnxTeacher | LogitsTeacher
TEACHER_KINDS = {"onnx": OnnxTeacher, "logits": LogitsTeacher}  # the key that selects each kind; else a ModelRef


@dataclass(frozen=True)
class DataSection:
    demo_task: str | None = None  # render a demo-world task instead of reading files
    train: Path | None = None  # unlabelled images (directory, flat directory or CSV)
    fewshot: Path | None = None  # labelled images for TransMiter+
    test: Path | None = None  # labelled images for the accuracy table
    classes: tuple[str, ...] | None = None
    classes_file: Path | None = None
    base_classes: int | None = None  # the first N classes are "base" in the table (default: half)
    train_per_class: int = 500  # demo task sizes
    test_per_class: int = 100
    # where the feature caches are computed: local (this process) or ray (a Ray cluster, the
    # [distributed] extra); the caches are the same either way, so switching redoes none
    engine: str = "local"
    address: str | None = None  # engine ray: HOST:PORT or auto of a running cluster (default: a local one)
    workers: int | None = None  # engine ray: encoding actors (default: one per CPU, or per gpus_per_worker GPUs)
    gpus_per_worker: float = 0.0  # engine ray


@dataclass(frozen=True)
class HeadSection:
    templates: str | None = None  # a built-in set (simple, openai, photo) or a file; default: simple,
    # or the demo task's own prompts
    logit_width: int = 1024
    auxiliary_vocabulary: Path | None = None
    seed: int = 0


@dataclass(frozen=True)
class AdapterSection:
    latent_dim: int | None = None  # default: the logit width
    mlp_ratio: int = 4
    num_layers: int = 1


@dataclass(frozen=True)
class TransferSection:
    regularisation: float = 500.0
    lambda_mode: str = "sum"


@dataclass(frozen=True)
class PlusSection:
    enabled: bool = True
    shots: int = 4
    epochs: int = PlusSettings.epochs
    batch_size: int = PlusSettings.batch_size
    lr: float = PlusSettings.lr
    keep_orthogonal: bool = True


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 8
    max: int = 32


@dataclass(frozen=True)
class CalibrationSection:
    """Calibration images of the precisions that need them (int8)."""

    images: int = 128  # a seeded sample of this many unlabelled training images
    minimum: int = 32  # fewer usable images than this is refused
    seed: int = 0
    data: Path | None = None  # another unlabelled image set to calibrate on (default: data.train)
    # a graph that fails its gate keeps its most sensitive quantised nodes in fp32 until it passes
    # (deploy/qdq_fallback.py); false: it fails at once (exit 4)
    fallback: bool = True
    # a bank's tasks whose training images calibrate the backbone (default: every task); naming
    # them keeps the backbone's int8 graph when a task is added (docs/bank.md)
    tasks: tuple[str, ...] | None = None
    # the gate's optional stricter criterion: top-1 agreement with fp32 at least this (0-1); by
    # default labelled gates judge accuracy only (deploy/gate.py)
    agreement: float | None = None


@dataclass(frozen=True)
class ExportSection:
    precisions: tuple[str, ...] = registry.default_precisions()
    opset: int = 17
    softmax: bool = False
    batch: BatchRange = field(default_factory=BatchRange)
    workspace_mib: int = 4096
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    # graphs whose tensors pass this many bytes are written with ONNX external data (docs/export.md);
    # unset: TRANSMITER_EXTERNAL_DATA_THRESHOLD, else just under 2 GiB
    external_data_threshold: int | None = None


@dataclass(frozen=True)
class TaskRecipe:
    """One task: its teacher, its data and its settings (a bank recipe's ``tasks:`` entry, or
    the top level of a single-task recipe)."""

    name: str
    finetuned: Teacher
    data: DataSection
    head: HeadSection = field(default_factory=HeadSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    transfer: TransferSection = field(default_factory=TransferSection)
    plus: PlusSection = field(default_factory=PlusSection)


TASK_KEYS = tuple(f.name for f in fields(TaskRecipe))
SHARED_KEYS = ("source", "target", "export", "runtimes")  # one per recipe, never per task
# sections a task's mapping is merged into key by key (finetuned is replaced whole: a model
# has exactly one weight source)
MERGED_SECTIONS = {"data": DataSection, "head": HeadSection, "adapter": AdapterSection,
                   "extraction": ExtractionSettings, "transfer": TransferSection, "plus": PlusSection}


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    source: ModelRef
    target: ModelRef
    finetuned: Teacher | None = None  # a bank recipe may give it per task only
    data: DataSection | None = None
    head: HeadSection = field(default_factory=HeadSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    transfer: TransferSection = field(default_factory=TransferSection)
    plus: PlusSection = field(default_factory=PlusSection)
    export: ExportSection = field(default_factory=ExportSection)
    runtimes: tuple[str, ...] = registry.default_families()
    tasks: tuple[TaskRecipe, ...] = ()  # always filled: a single-task recipe is a bank of one
    bank: bool = False  # the recipe has a tasks: list (the export writes a bank, docs/bank.md)
    # where extraction and TransMiter+ train (method/device.py); not part of any step's key: the
    # results agree across devices to float rounding
    device: str = "auto"


class _Reader:
    """Builds the dataclasses from YAML mappings, naming the key of any mistake."""

    def __init__(self, path: Path, where: str | None = None) -> None:
        self.path = path
        self.where = where or f"recipe {path}"  # what a message names first
        # absolute: a path resolved against it names the same file after a change of directory
        self.base = path.absolute().parent

    def fail(self, key: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.where}: {key}: {problem}")

    def section(self, cls: type, raw: Any, key: str, nested: dict[str, type] | None = None) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a mapping, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls) if f.init]
        values = {}
        for name, value in raw.items():
            where = f"{key}.{name}"
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
                raise self.fail(where, f"unknown key{hint}")
            if nested and name in nested:
                values[name] = self.section(nested[name], value, where)
            else:
                values[name] = self.value(hints[name], value, where)
        if cls is HeadSection and values.get("templates") is not None:
            values["templates"] = self.templates(values["templates"])
        try:
            return cls(**values)
        except TypeError as exc:  # a required key is missing
            missing = [f.name for f in fields(cls) if f.init and f.name not in values
                       and f.default is MISSING and f.default_factory is MISSING]
            raise self.fail(key, f"missing key '{missing[0] if missing else exc}'") from exc

    def teacher(self, raw: Any, key: str) -> Teacher:
        """``finetuned:``: an open_clip model, or the kind its one selecting key names."""
        chosen = [kind for kind in TEACHER_KINDS if isinstance(raw, dict) and kind in raw]
        if len(chosen) > 1:
            raise self.fail(key, f"give one teacher kind, not both {' and '.join(chosen)}")
        if not chosen:
            return self.section(ModelRef, raw, key)
        return self.section(TEACHER_KINDS[chosen[0]], raw, key, nested={"preprocess": TeacherPreprocess})

    def resolve(self, value: str) -> Path:
        """A path as the recipe writes it, made absolute against the recipe file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base / path)

    def templates(self, value: str) -> str:
        """``head.templates``: a built-in set's name as it is, else a file, resolved like every
        other path (features/templates.py reads it later, from whatever directory)."""
        from ..features.templates import BUILTIN_TEMPLATES

        return value if value in BUILTIN_TEMPLATES else str(self.resolve(value))

    def written(self, path: str | Path) -> str:
        """A resolved path as the recipe wrote it, for messages: relative to the recipe's
        directory when it was written so."""
        try:
            return str(Path(path).relative_to(self.base))
        except ValueError:
            return str(path)

    def value(self, hint: Any, value: Any, where: str) -> Any:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            if value is None:
                return None
            hint = args[0]
        if hint is bool:
            if not isinstance(value, bool):
                raise self.fail(where, f"must be true or false, got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(where, f"must be an integer, got {value!r}")
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(where, f"must be a number, got {value!r}")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise self.fail(where, f"must be a string, got {value!r}")
            return value
        if hint is Path:
            if not isinstance(value, str) or not value:
                raise self.fail(where, f"must be a path, got {value!r}")
            return self.resolve(value)
        if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is float:
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value):
                raise self.fail(where, f"must be a list of numbers, got {value!r}")
            return tuple(float(v) for v in value)
        if typing.get_origin(hint) is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(where, f"must be a list of strings, got {value!r}")
            return tuple(value)
        raise self.fail(where, f"unsupported value {value!r}")  # pragma: no cover - schema bug


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the recipe bounds built into its composer, which recurses once
    per nesting level (so the depth is counted before Python's own limit is near), and refusing
    a key given twice in one mapping (PyYAML would keep the last silently, so half of what the
    user wrote would be ignored)."""

    def __init__(self, stream, path: Path) -> None:
        super().__init__(stream)
        self.path, self.depth, self.nodes = path, 0, 0

    def compose_node(self, parent, index):
        self.nodes += 1
        if self.nodes > MAX_RECIPE_NODES:
            raise RecipeError(f"recipe {self.path} has more than {MAX_RECIPE_NODES} YAML nodes")
        self.depth += 1
        try:
            if self.depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"recipe {self.path} nests deeper than {MAX_RECIPE_DEPTH} levels "
                                  f"(line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path) -> Any:
    """The recipe file parsed within the recipe bounds: size first, then nesting and node count
    while it is composed."""
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        loader = _RecipeLoader(path.read_text(encoding="utf-8"), path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from exc


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{exc.context + ': ' if exc.context else ''}{exc.problem}{where}"
    return " ".join(str(exc).split())


def load_recipe(path: Path, check_files: bool = True) -> Recipe:
    """Read and validate a recipe; raise RecipeError naming the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    raw = _parse_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping")
    reader = _Reader(path)
    nested_models = {name: ModelRef for name in ("source", "finetuned", "target")}
    top = {
        "name": str, "source": ModelRef, "finetuned": ModelRef, "target": ModelRef, "data": DataSection,
        "head": HeadSection, "adapter": AdapterSection, "extraction": ExtractionSettings,
        "transfer": TransferSection, "plus": PlusSection, "export": ExportSection, "runtimes": tuple,
        "tasks": list, "device": str,
    }
    for key in raw:
        if key not in top:
            close = difflib.get_close_matches(str(key), list(top), n=1)
            raise reader.fail(str(key), "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                                          f" (known: {', '.join(top)})"))
    bank = "tasks" in raw
    for key in ("name", "source", "target") if bank else ("name", "source", "finetuned", "target", "data"):
        if key not in raw:
            raise reader.fail(key, "missing key")
    values: dict[str, Any] = {"path": path, "name": reader.value(str, raw["name"], "name"), "bank": bank}
    for key, cls in top.items():
        if key in ("name", "tasks") or key not in raw:
            continue
        if bank and key == "data":
            if not isinstance(raw[key], dict):
                raise reader.fail(key, f"must be a mapping, got {type(raw[key]).__name__}")
            continue  # only defaults for the tasks' data: checked merged into each task
        if key == "finetuned":
            values[key] = reader.teacher(raw[key], key)
        elif key in nested_models:
            values[key] = reader.section(ModelRef, raw[key], key)
        elif key == "export":
            values[key] = reader.section(ExportSection, raw[key], key,
                                         nested={"batch": BatchRange, "calibration": CalibrationSection})
        elif key == "runtimes":
            values[key] = reader.value(tuple[str, ...], raw[key], key)
        elif key == "device":
            values[key] = reader.value(str, raw[key], key)
        else:
            values[key] = reader.section(cls, raw[key], key)
    values["tasks"] = _tasks(raw, reader) if bank else (TaskRecipe(
        values["name"], values["finetuned"], values["data"],
        **{key: values[key] for key in MERGED_SECTIONS if key != "data" and key in values}),)
    recipe = Recipe(**values)
    _check_semantics(recipe, reader, check_files)
    return recipe


def with_target(recipe: Recipe, target: ModelRef, where: str) -> Recipe:
    """``recipe`` with another target, checked as a recipe's own target is (the close model names
    of an unknown one, a missing checkpoint); messages begin with ``where``."""
    from .. import demo  # noqa: F401  (registers the demo world's architectures)
    from ..features.models import known_models

    _check_model(target, "target", known_models(), _Reader(recipe.path, where), check_files=True)
    return dataclasses.replace(recipe, target=target)


def _tasks(raw: dict, reader: _Reader) -> tuple[TaskRecipe, ...]:
    """The ``tasks:`` list, each task's sections merged over the top level's."""
    listed = raw["tasks"]
    if not isinstance(listed, list) or not listed:
        raise reader.fail("tasks", "must be a non-empty list of tasks")
    tasks, seen = [], set()
    for index, task in enumerate(listed):
        where = f"tasks[{index}]"
        if not isinstance(task, dict):
            raise reader.fail(where, f"must be a mapping, got {type(task).__name__}")
        if "name" not in task:
            raise reader.fail(where, "missing key 'name'")
        name = task["name"]
        if not isinstance(name, str) or TASK_NAME.fullmatch(name) is None:
            raise reader.fail(f"{where}.name", f"{name!r} is not an identifier (letters, digits and _, not starting "
                              "with a digit, at most 64 characters): task names become tensor and file names")
        if name in seen:
            raise reader.fail(f"{where}.name", f"task '{name}' is given twice")
        seen.add(name)
        where = f"tasks.{name}"
        for key in task:
            if key in SHARED_KEYS:
                raise reader.fail(f"{where}.{key}", f"every task of a bank shares the recipe's {key} "
                                  "(give it once, at the top level)")
            if key not in TASK_KEYS:
                close = difflib.get_close_matches(str(key), TASK_KEYS, n=1)
                raise reader.fail(f"{where}.{key}", "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                                                     f" (known: {', '.join(TASK_KEYS)})"))
        finetuned = task.get("finetuned", raw.get("finetuned"))
        if finetuned is None:
            raise reader.fail(f"{where}.finetuned", "missing key (give it in the task or at the top level)")
        values: dict[str, Any] = {"name": name, "finetuned": reader.teacher(finetuned, f"{where}.finetuned")}
        for key, cls in MERGED_SECTIONS.items():
            own, default = task.get(key), raw.get(key)
            merged = {**default, **own} if isinstance(own, dict) and isinstance(default, dict) else (
                own if key in task else default)
            if key == "data" and merged is None:
                raise reader.fail(f"{where}.data", "missing key (give it in the task or at the top level)")
            if merged is not None or key == "data":
                values[key] = reader.section(cls, merged, f"{where}.{key}")
        tasks.append(TaskRecipe(**values))
    return tuple(tasks)


def _check_semantics(recipe: Recipe, reader: _Reader, check_files: bool) -> None:
    from .. import demo  # noqa: F401  (registers the demo world's architectures)
    from ..features.models import known_models
    from ..features.templates import BUILTIN_TEMPLATES

    known = known_models()
    for key, ref in (("source", recipe.source), ("target", recipe.target),
                     *((("finetuned", recipe.finetuned),) if recipe.bank and recipe.finetuned is not None else ()),
                     *((_prefix(recipe, task) + "finetuned", task.finetuned) for task in recipe.tasks)):
        if isinstance(ref, ModelRef):
            _check_model(ref, key, known, reader, check_files)
        else:
            _check_teacher(ref, key, reader, check_files)
    for task in recipe.tasks:
        _check_task(task, _prefix(recipe, task), reader, check_files, BUILTIN_TEMPLATES)
    if recipe.export.opset < 1:
        raise reader.fail("export.opset", f"must be positive, got {recipe.export.opset}")
    if recipe.export.external_data_threshold is not None and recipe.export.external_data_threshold < 0:
        raise reader.fail("export.external_data_threshold",
                          f"must be a non-negative number of bytes, got {recipe.export.external_data_threshold}")
    for index, precision in enumerate(recipe.export.precisions):
        if precision not in PRECISIONS:
            raise reader.fail("export.precisions",
                              f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
        if precision in recipe.export.precisions[:index]:
            raise reader.fail("export.precisions", f"'{precision}' is listed twice (give each precision once)")
    if registry.REFERENCE_PRECISION not in recipe.export.precisions:
        raise reader.fail("export.precisions", "must include fp32 (the reference every other precision is checked against)")
    _check_calibration(recipe, reader, check_files)
    batch = recipe.export.batch
    if not 1 <= batch.min <= batch.opt <= batch.max:
        raise reader.fail("export.batch", f"need 1 <= min <= opt <= max, got {batch.min}/{batch.opt}/{batch.max}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", recipe.device):
        raise reader.fail("device", f"must be {DEVICE_HELP}, got '{recipe.device}'")
    for runtime in recipe.runtimes:
        if runtime not in RUNTIME_FAMILIES:
            raise reader.fail("runtimes", f"unknown runtime '{runtime}' (known: {', '.join(RUNTIME_FAMILIES)})")


def _prefix(recipe: Recipe, task: TaskRecipe) -> str:
    """Where a task's keys are, as errors name them: the top level of a single-task recipe."""
    return f"tasks.{task.name}." if recipe.bank else ""


def _check_model(ref: ModelRef, key: str, known: list[str], reader: _Reader, check_files: bool) -> None:
    if ref.name not in known:  # first: an unknown name is the mistake whatever its weights
        close = difflib.get_close_matches(ref.name, known, n=3)
        raise reader.fail(f"{key}.name", f"open_clip does not know model '{ref.name}'"
                          + (f" (close: {', '.join(close)})" if close else ""))
    chosen = [k for k in ("pretrained", "checkpoint", "demo_weights", "init_seed") if getattr(ref, k) is not None]
    if len(chosen) != 1:
        raise reader.fail(key, "give exactly one of pretrained, checkpoint, demo_weights, init_seed"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    if check_files and ref.checkpoint is not None and not ref.checkpoint.is_file():
        raise reader.fail(f"{key}.checkpoint", f"file not found: {ref.checkpoint}")
    if ref.demo_weights is not None:
        from ..demo.weights import shipped_weights_dir

        shipped = sorted(p.stem for p in shipped_weights_dir().glob("*.safetensors"))
        if ref.demo_weights not in shipped:
            raise reader.fail(f"{key}.demo_weights", f"not a shipped demo model: '{ref.demo_weights}' "
                              f"(known: {', '.join(shipped)})")


def _check_teacher(ref: OnnxTeacher | LogitsTeacher, key: str, reader: _Reader, check_files: bool) -> None:
    if isinstance(ref, LogitsTeacher):
        if ref.logits.suffix not in LOGITS_FILE_SUFFIXES:
            raise reader.fail(f"{key}.logits",
                              f"must be a {' or '.join(LOGITS_FILE_SUFFIXES)} file, got {ref.logits.name}")
        files = {"logits": ref.logits, "images": images_path(ref)}
    else:
        if ref.preprocess is not None:
            try:
                check_preprocess(ref.preprocess)
            except InputError as exc:
                raise reader.fail(f"{key}.preprocess", str(exc)) from exc
        files = {"onnx": ref.onnx}
    if check_files:
        for name, path in files.items():
            if not path.is_file():
                raise reader.fail(f"{key}.{name}", f"file not found: {path}")


def _check_task(task: TaskRecipe, prefix: str, reader: _Reader, check_files: bool, builtin_templates) -> None:
    data = task.data
    if data.demo_task is not None:
        from ..demo.tasks import TASKS

        if data.demo_task not in TASKS:
            raise reader.fail(f"{prefix}data.demo_task", f"unknown demo task '{data.demo_task}' "
                              f"(known: {', '.join(TASKS)})")
        for key in ("train", "fewshot", "test", "classes", "classes_file"):
            if getattr(data, key) is not None:
                raise reader.fail(f"{prefix}data.{key}", "not used with data.demo_task (the task brings its own data)")
    else:
        if data.train is None:
            raise reader.fail(f"{prefix}data", "give data.demo_task or data.train (the unlabelled images)")
        if (data.classes is None) == (data.classes_file is None):
            raise reader.fail(f"{prefix}data", "give exactly one of data.classes and data.classes_file")
        if task.plus.enabled and data.fewshot is None:
            raise reader.fail(f"{prefix}data.fewshot", "missing: plus.enabled needs labelled few-shot images "
                              "(or set plus.enabled: false)")
        if check_files:
            for key in ("train", "fewshot", "test", "classes_file"):
                value = getattr(data, key)
                if value is not None and not value.exists():
                    raise reader.fail(f"{prefix}data.{key}", f"not found: {value}")
    if data.engine not in ("local", "ray"):
        raise reader.fail(f"{prefix}data.engine", f"must be 'local' or 'ray', got '{data.engine}'")
    if data.engine == "local":
        for key in ("address", "workers"):
            if getattr(data, key) is not None:
                raise reader.fail(f"{prefix}data.{key}", "only with data.engine: ray")
        if data.gpus_per_worker:
            raise reader.fail(f"{prefix}data.gpus_per_worker", "only with data.engine: ray")
    if data.workers is not None and data.workers < 1:
        raise reader.fail(f"{prefix}data.workers", f"must be positive, got {data.workers}")
    if not data.gpus_per_worker >= 0:
        raise reader.fail(f"{prefix}data.gpus_per_worker", f"must be 0 or more, got {data.gpus_per_worker}")
    templates = task.head.templates  # a built-in set's name, or a file resolved when read
    if templates is not None and templates not in builtin_templates and check_files \
            and not Path(templates).is_file():
        written = reader.written(templates)
        raise reader.fail(f"{prefix}head.templates", f"'{written}' is neither a built-in set "
                          f"({', '.join(builtin_templates)}) nor a file"
                          + (f" (looked for {templates})" if written != templates else ""))
    for key, value in (("head.logit_width", task.head.logit_width), ("plus.shots", task.plus.shots)):
        if value < 1:
            raise reader.fail(prefix + key, f"must be positive, got {value}")
    if task.transfer.lambda_mode not in ("sum", "mean"):
        raise reader.fail(f"{prefix}transfer.lambda_mode", f"must be 'sum' or 'mean', got '{task.transfer.lambda_mode}'")
    try:
        task.extraction.validate(f"{prefix}extraction")
    except InputError as exc:
        raise RecipeError(f"recipe {reader.path}: {exc}") from exc


def _check_calibration(recipe: Recipe, reader: _Reader, check_files: bool) -> None:
    calibration = recipe.export.calibration
    if calibration.minimum < 1:
        raise reader.fail("export.calibration.minimum", f"must be positive, got {calibration.minimum}")
    if calibration.images < calibration.minimum:
        raise reader.fail("export.calibration.images", f"{calibration.images} is below the minimum "
                          f"({calibration.minimum})")
    if calibration.agreement is not None and not 0 < calibration.agreement <= 1:
        raise reader.fail("export.calibration.agreement", f"must be in (0, 1], got {calibration.agreement}")
    if calibration.tasks is not None:
        names = [task.name for task in recipe.tasks]
        if not recipe.bank:
            raise reader.fail("export.calibration.tasks", "only a task bank has tasks to calibrate on "
                              "(a single-task recipe calibrates on data.train or export.calibration.data)")
        if calibration.data is not None:
            raise reader.fail("export.calibration.tasks", "give either tasks or data, not both")
        unknown = [name for name in calibration.tasks if name not in names]
        if unknown or not calibration.tasks or len(set(calibration.tasks)) != len(calibration.tasks):
            raise reader.fail("export.calibration.tasks", f"must name tasks of the bank, each once, got "
                              f"{list(calibration.tasks)} (tasks: {', '.join(names)})")
    if check_files and calibration.data is not None and not calibration.data.exists():
        raise reader.fail("export.calibration.data", f"not found: {calibration.data}")
