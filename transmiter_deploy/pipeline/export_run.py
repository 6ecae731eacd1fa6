"""The state one export run shares between its steps, and the frame every export runs in.

:class:`ExportRun` is what the steps of a single-task export (pipeline/export.py), of each task
of a bank (pipeline/bank_export.py) and of ``transmiter teacher`` read and fill: the recipe, where
it writes, the steps' keys, the models (loaded on first use). :func:`running_export` is the frame
both exports run in: the directory's lock, stale staging removed, the recipe's precisions that can
be made here, and the report written at the end.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..artifacts import read_json, sha256_file
from ..errors import DependencyError
from ..method.device import resolve_device
from ..runtimes.registry import PRECISIONS
from .recipe import ModelRef, Recipe, TaskRecipe
from .report import ExportOutcome, write_report
from .steps import Steps, exclusive, remove_stale_staging, step_key

REFERENCES = "references"  # the onnx step's PyTorch outputs on the parity images, read by validate
# written by `transmiter upgrade` (upgrade/run.py) before it runs the export: the export it was
# made from, which the deployable manifest records (deploy/export_format.py's Lineage)
LINEAGE_FILE = "lineage.json"


def model_specs(recipe: Recipe, task: TaskRecipe | None = None) -> dict[str, Any]:
    """The ModelSpec of source, teacher (``task``'s, by default the first task's, when it is an
    open_clip model) and target; the shipped demo weights are verified once."""
    from ..demo.weights import demo_model_spec, shipped_weights_dir, verify_weights
    from ..features.models import ModelSpec

    task = task or recipe.tasks[0]
    refs: dict[str, ModelRef] = {"source": recipe.source, "teacher": task.finetuned, "target": recipe.target}
    if not isinstance(task.finetuned, ModelRef):  # an ONNX or precomputed teacher (pipeline/teachers.py)
        del refs["teacher"]
    if any(ref.demo_weights is not None for ref in refs.values()):
        verify_weights(shipped_weights_dir())
    return {tag: demo_model_spec(shipped_weights_dir(), ref.demo_weights) if ref.demo_weights is not None
            else ModelSpec(ref.name, pretrained=ref.pretrained, checkpoint=ref.checkpoint,
                           init_seed=ref.init_seed if ref.init_seed is not None else 0)
            for tag, ref in refs.items()}


def model_key(spec) -> dict[str, Any]:
    """What identifies a model's weights: the tag, or the checkpoint's content."""
    return {"name": spec.name, "pretrained": spec.pretrained, "init_seed": spec.init_seed,
            "checkpoint_sha256": sha256_file(spec.checkpoint) if spec.checkpoint else None}


class Models:
    """Loads each model on first use only: a fully incremental re-run loads none. The tasks of
    a bank share one instance of each model (``loaded`` is keyed by the weights, not the tag)."""

    def __init__(self, specs: dict[str, Any], loaded: dict[str, Any] | None = None) -> None:
        self.specs = specs
        self.loaded: dict[str, Any] = {} if loaded is None else loaded
        # computed once: a checkpoint's key is the sha256 of its (possibly large) file
        self.model_keys = {tag: model_key(spec) for tag, spec in specs.items()}
        self.keys = {tag: step_key(key) for tag, key in self.model_keys.items()}

    def __getitem__(self, tag: str):
        from ..features.models import load_model

        key = self.keys[tag]
        if key not in self.loaded:
            self.loaded[key] = load_model(self.specs[tag])
        return self.loaded[key]

    def for_specs(self, specs: dict[str, Any]) -> "Models":
        return Models(specs, self.loaded)


@dataclass
class ExportRun:
    """One export run: the recipe, where it writes, and what the steps so far produced."""

    recipe: Recipe
    out: Path
    steps: Steps
    progress: bool
    log: Callable[[str], None]
    task: TaskRecipe | None = None  # whose data and settings the per-task steps use (default: the only one)
    root: Path | None = None  # where the per-task outputs go (default: out)
    splits: dict[str, Path] = field(default_factory=dict)
    split_keys: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    task_templates: tuple[str, ...] | None = None
    demo_vocabulary: list[str] | None = None
    models: Models | None = None
    model_keys: dict[str, dict] = field(default_factory=dict)
    cache_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    head_keys: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # extract, transfer, final (the adapter exported), onnx
    final_stage: str = "transferred"
    teacher_check: dict | None = None  # the teacher check's record (pipeline/teacher_check.py)
    precomputed: dict | None = None  # a precomputed-logits teacher matched to every split, once
    device: Any = field(default=None, init=False)  # where extraction and TransMiter+ train (recipe.device)
    precisions: tuple[str, ...] = ()  # the recipe's, less those skipped here
    lineage: dict | None = None  # what an upgrade made this export from (LINEAGE_FILE), for the manifest

    def __post_init__(self) -> None:
        self.task = self.task or self.recipe.tasks[0]
        self.root = self.root or self.out
        self.device = resolve_device(self.recipe.device)  # a GPU asked for and missing stops the run here

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def onnx_dir(self) -> Path:
        return self.out / "onnx"

    def cache(self, tag: str, split: str):
        from ..features.cache import load_cache

        return load_cache(self.root / "caches" / f"{tag}-{split}")

    def head(self, tag: str):
        from ..features.heads import load_head

        return load_head(self.root / "heads" / tag)

    def stand_in_tokenizers(self) -> dict[str, str]:
        """Head role -> the stand-in tokenizer it was built with (random-weight text towers whose
        own tokenizer is unavailable offline), for the heads this run has."""
        heads = {tag: self.head(tag) for tag in ("source", "teacher", "target") if (self.root / "heads" / tag).is_dir()}
        return {tag: head.stand_in_tokenizer for tag, head in heads.items() if head.stand_in_tokenizer}

    @property
    def teacher_kind(self) -> str:
        from .teachers import teacher_kind

        return teacher_kind(self.task.finetuned)

    def teacher(self, split: str):
        """The teacher's task logits on ``split`` (a TeacherLogits), whatever its kind; one whose
        ``extra`` has ``unavailable`` holds none (a precomputed file without rows for the split)."""
        from ..features.teacher_logits import load_teacher_logits
        from .phases import checkpoint_teacher_logits

        if self.teacher_kind == "checkpoint":
            return checkpoint_teacher_logits(self.cache("teacher", split), self.head("teacher"))
        return load_teacher_logits(self.teacher_logits_dir(split))

    def teacher_logits_dir(self, split: str) -> Path:
        """Where an ONNX or precomputed teacher's logits on ``split`` go (an open_clip teacher's
        cache is caches/teacher-<split>: another kind of artifact, so a recipe can switch kinds)."""
        return self.root / "caches" / f"teacher-logits-{split}"

    def adapter(self, stage: str):
        from ..features.adapter_artifact import load_adapter

        return load_adapter(self.adapters / stage)

    def parity_images(self) -> Path:
        return self.splits.get("test") or self.splits["train"]



def export_precisions(run: ExportRun) -> tuple[str, ...]:
    """The recipe's precisions whose converters can run here; the others are reported as skipped."""
    chosen = []
    for name in run.recipe.export.precisions:
        missing = PRECISIONS[name].missing()
        if missing is not None:
            if not PRECISIONS[name].skip_if_missing:
                raise DependencyError(f"the recipe asks for {name}, but {missing}")
            run.steps.unavailable(f"onnx-{name}", f"{missing}; exporting without {name}")
            continue
        chosen.append(name)
    return tuple(chosen)


def read_lineage(out: Path) -> dict | None:
    """The lineage an upgrade wrote into ``out`` (None for an export no upgrade made)."""
    from ..deploy.export_format import Lineage

    path = out / LINEAGE_FILE
    return Lineage.from_dict(read_json(path, "lineage"), str(path)).to_dict() if path.is_file() else None


def key_lineage(inputs: dict, lineage: dict | None) -> None:
    """A step that writes the deployable manifest is keyed by the lineage it records, where there
    is one (exports no upgrade made keep their keys)."""
    if lineage is not None:
        inputs["lineage"] = lineage


def key_external_data(inputs: dict, threshold: int) -> None:
    """A step that writes graphs is keyed by the external-data threshold (it decides the files
    written) when it is not the default: a changed threshold redoes the step, and exports made
    before the setting existed keep their keys."""
    from ..runtimes.onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD

    if threshold != DEFAULT_EXTERNAL_DATA_THRESHOLD:
        inputs["external_data_threshold"] = threshold


@contextmanager
def running_export(recipe: Recipe, out_dir: Path, force: bool, progress: bool,
                   log: Callable[[str], None]) -> Iterator[tuple[ExportRun, ExportOutcome]]:
    """The frame of an export: ``out_dir`` locked for this run, stale staging from a killed run
    removed, the run state (its precisions: the recipe's that can be made here, the others
    reported as skipped or, when they must not be skipped, stopping the run here) and the outcome;
    when the block ends without error, the steps are recorded in it, the report written and the
    resolved recipe recorded beside it (pipeline/recipe_record.py: what an upgrade reruns), so that a
    run that failed or was killed leaves the record of the last one that finished."""
    from .recipe_record import write_recipe_record

    out = Path(out_dir)
    with exclusive(out):
        remove_stale_staging(out, log)
        run = ExportRun(recipe, out, Steps(out, force, log), progress, log)
        run.lineage = read_lineage(out)
        outcome = ExportOutcome(out)
        run.precisions = export_precisions(run)
        yield run, outcome
        outcome.steps = run.steps.done
        write_report(recipe, outcome)
        write_recipe_record(recipe, out)
