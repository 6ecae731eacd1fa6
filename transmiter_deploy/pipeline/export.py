"""`transmiter export RECIPE`: a recipe run end to end, step by step, incrementally.

Steps: data -> feature caches (an ONNX or precomputed teacher: its logits,
pipeline/teachers.py) -> heads -> extract -> transfer -> TransMiter+ -> teacher
check (pipeline/teacher_check.py) -> evaluate -> ONNX (every precision of the
recipe, parity) -> TensorRT engines -> validation on every available runtime
-> report. Each step is keyed by the
content of what it reads (:mod:`.steps`) and skipped when unchanged; every step
writes its outputs atomically, so a failure leaves the previous outputs and
every completed step usable.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..artifacts import atomic_directory, load_tensors, read_json, save_tensors, sha256_file, write_json
from ..errors import DependencyError, InputError
from ..method.device import resolve_device
from ..runtimes.registry import PRECISIONS, RUNTIMES, reference_runtime
from .recipe import ModelRef, Recipe, TaskRecipe
from .report import ExportOutcome, write_report
from .steps import Steps, exclusive, remove_stale_staging, step_key, tree_sha256

_exclusive = exclusive  # the name tests and earlier callers import

REFERENCES = "references"  # the onnx step's PyTorch outputs on the parity images, read by validate


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


class _Models:
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

    def for_specs(self, specs: dict[str, Any]) -> "_Models":
        return _Models(specs, self.loaded)


@dataclass
class _Run:
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
    models: _Models | None = None
    model_keys: dict[str, dict] = field(default_factory=dict)
    cache_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    head_keys: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # extract, transfer, final (the adapter exported), onnx
    final_stage: str = "transferred"
    teacher_check: dict | None = None  # the teacher check's record (pipeline/teacher_check.py)
    precomputed: dict | None = None  # a precomputed-logits teacher matched to every split, once
    device: Any = field(default=None, init=False)  # where extraction and TransMiter+ train (recipe.device)
    precisions: tuple[str, ...] = ()  # the recipe's, less those skipped here

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


def run_export(recipe: Recipe, out_dir: Path, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> ExportOutcome:
    """Run a validated recipe; returns what ran, what was skipped and why, and the accuracy table."""
    out = Path(out_dir)
    with exclusive(out):
        remove_stale_staging(out, log)
        run = _Run(recipe, out, Steps(out, force, log), progress, log)
        outcome = ExportOutcome(out)
        run.precisions = _export_precisions(run)  # a precision that cannot be made stops the run here
        specs = model_specs(recipe)
        run.models = _Models(specs)
        run.model_keys = run.models.model_keys
        outcome.accuracy = task_steps(run)
        outcome.teacher_check = run.teacher_check
        _onnx(run)
        outcome.export_dir = run.onnx_dir
        _drop_unasked(run)
        failures = []
        for name in run.precisions:
            if PRECISIONS[name].needs_calibration:
                failure = _calibrated(run, name, outcome)
                failures += [failure] if failure is not None else []
        engine_keys = _engines(run)
        outcome.validation, outcome.validation_skipped = _validate(run, engine_keys)
        outcome.steps = run.steps.done
        write_report(recipe, outcome)
    if failures:  # after the report, which shows the failed gate; the other artifacts stay
        raise failures[0]
    return outcome


def task_steps(run: _Run) -> list[dict]:
    """A task's steps up to its adapter and accuracy table (empty without test images): data,
    caches, heads, extract, transfer, TransMiter+, teacher check, evaluate. ``run.models`` is set."""
    from .teacher_check import teacher_check_step
    from .teachers import teacher_key

    if "teacher" not in run.model_keys:  # an ONNX or precomputed teacher: keyed by its files
        run.model_keys = {**run.model_keys, "teacher": teacher_key(run.task.finetuned)}
    _data(run)
    _caches(run)
    _heads(run)
    _extract(run)
    _transfer(run)
    _plus(run)
    run.teacher_check = teacher_check_step(run)
    return _evaluate(run) if "test" in run.splits else []


def _data(run: _Run) -> None:
    """Split locations and their content keys, the class names, the demo templates and vocabulary."""
    data = run.task.data
    if data.demo_task is None:
        classes = list(data.classes) if data.classes is not None else [
            line.strip() for line in data.classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        run.classes = classes
        run.splits = {split: getattr(data, split) for split in ("train", "fewshot", "test")
                      if getattr(data, split) is not None}
        run.split_keys = {split: tree_sha256(path) for split, path in run.splits.items()}
        return
    from ..demo import tasks as demo_tasks
    from ..demo import world as demo_world
    from ..demo.tasks import auxiliary_phrases, get_task, write_split

    task = get_task(data.demo_task)
    root = run.root / "data"
    sizes = {"train": data.train_per_class, "fewshot": run.task.plus.shots, "test": data.test_per_class}
    renderer = {name: sha256_file(Path(module.__file__)) for name, module in
                (("world", demo_world), ("tasks", demo_tasks))}

    def render() -> None:
        with atomic_directory(root, "data.json") as staging:
            for split, per_class in sizes.items():
                write_split(task, split, staging / split, per_class, progress=run.progress)
            write_json(staging / "data.json", {"demo_task": task.name, "per_class": sizes})

    key = run.steps.run("data", {"task": task.name, "sizes": sizes, "renderer": renderer}, [root / "data.json"], render)
    run.splits, run.split_keys = {split: root / split for split in sizes}, {split: key for split in sizes}
    run.classes, run.task_templates, run.demo_vocabulary = list(task.classes), task.templates, auxiliary_phrases()


def _caches(run: _Run) -> None:
    """Feature caches: the models see each image once (here, or on a Ray cluster: the same caches,
    under the same step keys)."""
    from ..features.cache import build_cache
    from ..features.datasets import open_dataset

    data = run.task.data
    needed = [("source", "train"), ("teacher", "train"), ("target", "train")]
    if run.task.plus.enabled or "fewshot" in run.splits:  # TransMiter+, and the teacher check
        needed.append(("target", "fewshot"))
    if "fewshot" in run.splits:
        needed.append(("teacher", "fewshot"))
    if "test" in run.splits:
        needed += [("source", "test"), ("teacher", "test"), ("target", "test")]
    if run.teacher_kind != "checkpoint":  # its file is checked before hours of encoding, not after
        needed.sort(key=lambda entry: entry[0] != "teacher")
    joined = False  # one Ray cluster for all the caches, joined by the first that needs building
    with ExitStack() as cluster:
        def build(tag: str, split: str, where: Path) -> None:
            nonlocal joined
            dataset = open_dataset(run.splits[split], run.classes)
            if data.engine != "ray":
                build_cache(run.models[tag], dataset, where, progress=run.progress)
                return
            from ..features.distributed_cache import RayCacheSettings, build_cache_ray, ray_cluster

            if not joined:
                cluster.enter_context(ray_cluster(data.address))
                joined = True
            build_cache_ray(run.models.specs[tag], dataset, where,
                            RayCacheSettings(data.address, data.workers, data.gpus_per_worker), progress=run.progress)

        for tag, split in needed:
            where = run.root / "caches" / f"{tag}-{split}"
            if tag == "teacher" and run.teacher_kind != "checkpoint":
                where = run.teacher_logits_dir(split)
                work, marker = (lambda split=split, where=where: _teacher_logits(run, split, where)), "teacher.json"
            else:
                work, marker = (lambda tag=tag, split=split, where=where: build(tag, split, where)), "cache.json"
            run.cache_keys[tag, split] = run.steps.run(
                f"cache-{tag}-{split}", {"model": run.model_keys[tag], "data": run.split_keys[split], "classes": run.classes},
                [where / marker], work)


def _teacher_logits(run: _Run, split: str, where: Path) -> None:
    """An ONNX or precomputed teacher's logits on ``split``, stored like a cache. A precomputed
    file is matched to every split at once, so an image missing from the test split stops the
    run before any of its artifacts is written."""
    from ..features.datasets import open_dataset
    from ..features.teacher_logits import save_teacher_logits
    from .teachers import match_precomputed, onnx_teacher_logits, read_precomputed, unavailable_teacher

    key = run.model_keys["teacher"]
    if run.teacher_kind == "onnx":
        save_teacher_logits(onnx_teacher_logits(run.task.finetuned, open_dataset(run.splits[split], run.classes),
                                                len(run.classes), key, progress=run.progress), where)
        return
    if run.precomputed is None:
        datasets = {name: open_dataset(path, run.classes) for name, path in run.splits.items()}
        run.precomputed = match_precomputed(read_precomputed(run.task.finetuned, run.classes), datasets, key)
    save_teacher_logits(run.precomputed[split] or unavailable_teacher(split, key, run.classes), where)


def _heads(run: _Run) -> None:
    """Zero-shot heads over the task classes (+ auxiliary classes for source and target)."""
    from ..features.heads import build_head, save_head
    from ..features.vocabulary import select_auxiliary

    head_recipe = run.task.head
    templates = head_templates(run)
    if head_recipe.auxiliary_vocabulary is not None:
        vocabulary = [line.strip() for line in head_recipe.auxiliary_vocabulary.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    else:
        vocabulary = run.demo_vocabulary
    auxiliary = select_auxiliary(run.classes, head_recipe.logit_width, head_recipe.seed, vocabulary=vocabulary)
    for tag in ("source", "teacher", "target") if run.teacher_kind == "checkpoint" else ("source", "target"):
        where = run.root / "heads" / tag
        names = [] if tag == "teacher" else auxiliary
        run.head_keys[tag] = run.steps.run(
            f"head-{tag}", {"model": run.model_keys[tag], "classes": run.classes, "auxiliary": names,
                            "templates": templates},
            [where / "head.json"],
            lambda tag=tag, where=where, names=names: save_head(
                build_head(run.models[tag], run.classes, names, templates, progress=run.progress), where))


def head_templates(run: _Run) -> tuple[str, ...]:
    """The prompt templates of the task's heads: the recipe's, else the demo task's, else simple."""
    from ..features.templates import resolve_templates

    templates = run.task.head.templates
    return resolve_templates(templates) if templates is not None else (run.task_templates or resolve_templates("simple"))


def _extract(run: _Run) -> None:
    from ..features.adapter_artifact import save_adapter
    from .phases import extract_adapter_from_teacher

    recipe = run.task
    run.keys["extract"] = run.steps.run(
        "extract", {"caches": [run.cache_keys["source", "train"], run.cache_keys["teacher", "train"]],
                    "heads": [run.head_keys["source"], run.head_keys.get("teacher")], "adapter": asdict(recipe.adapter),
                    "settings": recipe.extraction.to_dict()},
        [run.adapters / "extracted" / "adapter.json"],
        lambda: save_adapter(extract_adapter_from_teacher(
            run.cache("source", "train"), run.head("source"), run.teacher("train"),
            recipe.adapter.latent_dim, recipe.adapter.mlp_ratio, recipe.adapter.num_layers,
            recipe.extraction, progress=run.progress, device=run.device)[0], run.adapters / "extracted"))


def _transfer(run: _Run) -> None:
    from ..features.adapter_artifact import save_adapter
    from .phases import transfer_adapter

    transfer = run.task.transfer
    run.keys["transfer"] = run.keys["final"] = run.steps.run(
        "transfer", {"extract": run.keys["extract"],
                     "caches": [run.cache_keys["source", "train"], run.cache_keys["target", "train"]],
                     "heads": [run.head_keys["source"], run.head_keys["target"]], "settings": asdict(transfer)},
        [run.adapters / "transferred" / "adapter.json"],
        lambda: save_adapter(transfer_adapter(
            run.adapter("extracted"), run.cache("source", "train"), run.head("source"), run.cache("target", "train"),
            run.head("target"), transfer.regularisation, transfer.lambda_mode)[0], run.adapters / "transferred"))


def _plus(run: _Run) -> None:
    """TransMiter+ on the few labelled shots; when it runs, its adapter is the one exported."""
    if not run.task.plus.enabled:
        return
    from ..features.adapter_artifact import save_adapter
    from ..method.plus import PlusSettings
    from .phases import plus_adapter

    plus = run.task.plus
    settings = PlusSettings(epochs=plus.epochs, batch_size=plus.batch_size, lr=plus.lr,
                            keep_orthogonal=plus.keep_orthogonal, seed=run.task.extraction.seed)
    run.final_stage = "plus"
    run.keys["final"] = run.steps.run(
        "plus", {"transfer": run.keys["transfer"], "cache": run.cache_keys["target", "fewshot"],
                 "head": run.head_keys["target"], "shots": plus.shots, "settings": settings.to_dict()},
        [run.adapters / "plus" / "adapter.json"],
        lambda: save_adapter(plus_adapter(run.adapter("transferred"), run.cache("target", "fewshot"),
                                          run.head("target"), plus.shots, settings, progress=run.progress,
                                          device=run.device)[0],
                             run.adapters / "plus"))


def _evaluate(run: _Run) -> list[dict]:
    """Base-to-novel accuracy on the labelled test images, every stage side by side."""
    from ..features.cache import zero_shot_logits
    from ..method.evaluation import base_to_novel

    recipe, out = run.task, run.root

    def evaluate() -> None:
        test_labels = run.cache("target", "test").labels
        k = len(run.classes)
        target_logits = zero_shot_logits(run.cache("target", "test"), run.head("target"))
        teacher = run.teacher("test")
        rows = {
            "source zero-shot": zero_shot_logits(run.cache("source", "test"), run.head("source"))[:, :k],
            "source fine-tuned": None if teacher.extra.get("unavailable") else teacher.logits,
            "target zero-shot": target_logits[:, :k],
        }
        with torch.no_grad():
            for stage, label in (("transferred", "target + TransMiter"), ("plus", "target + TransMiter+")):
                if (run.adapters / stage / "adapter.json").is_file() and (stage != "plus" or recipe.plus.enabled):
                    rows[label] = run.adapter(stage).adapter.task_logits(target_logits)
        table = [{"model": name, **base_to_novel(logits, test_labels, recipe.data.base_classes)} if logits is not None
                 else {"model": name, "base": None, "novel": None, "hm": None, "all": None,
                       "note": f"not available: {teacher.extra['unavailable']}"}
                 for name, logits in rows.items()]
        write_json(out / "accuracy.json", {"rows": table})

    run.steps.run("evaluate", {"caches": [run.cache_keys[tag, "test"] for tag in ("source", "teacher", "target")],
                               "adapters": [run.keys["transfer"], run.keys["final"]],
                               "base_classes": recipe.data.base_classes},
                  [out / "accuracy.json"], evaluate)
    return read_json(out / "accuracy.json", "accuracy table")["rows"]


def _export_precisions(run: _Run) -> tuple[str, ...]:
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


def _key_external_data(inputs: dict, threshold: int) -> None:
    """A step that writes graphs is keyed by the external-data threshold (it decides the files
    written) when it is not the default: a changed threshold redoes the step, and exports made
    before the setting existed keep their keys."""
    from ..deploy.onnx_export import DEFAULT_EXTERNAL_DATA_THRESHOLD

    if threshold != DEFAULT_EXTERNAL_DATA_THRESHOLD:
        inputs["external_data_threshold"] = threshold


def _onnx(run: _Run) -> None:
    """The adapter fused into the target's head, exported and verified against PyTorch; the
    PyTorch outputs on the parity images are kept for the validation step."""
    from ..deploy.onnx_export import ExportSettings, export_deployment, parity_pixels, resolve_external_data_threshold

    export = run.recipe.export
    precisions = tuple(name for name in run.precisions if not PRECISIONS[name].needs_calibration)
    threshold = resolve_external_data_threshold(export.external_data_threshold)

    def work() -> None:
        report = export_deployment(run.models["target"], run.head("target"), run.adapter(run.final_stage), run.onnx_dir,
                                   parity_pixels(run.models["target"], run.parity_images(), count=16),
                                   ExportSettings(opset=export.opset, softmax=export.softmax, precisions=precisions,
                                                  external_data_threshold=threshold),
                                   log=run.log)
        with atomic_directory(run.out / REFERENCES, "references.json") as staging:
            digest = save_tensors(staging / "parity.safetensors", {
                "pixels": torch.from_numpy(report.references.pixels),
                "outputs": torch.from_numpy(report.references.outputs)})
            write_json(staging / "references.json", {"parity.safetensors": digest})

    inputs = {"adapter": run.keys["final"], "target": run.model_keys["target"], "head": run.head_keys["target"],
              "opset": export.opset, "softmax": export.softmax, "precisions": list(precisions),
              "images": run.split_keys.get("test") or run.split_keys["train"]}
    _key_external_data(inputs, threshold)
    run.keys["onnx"] = run.steps.run("onnx", inputs, [run.onnx_dir / "manifest.json",
                                                      run.out / REFERENCES / "references.json"], work)


def _gate_images(run: _Run):
    """The recipe's labelled test images, or else held-out training images (agreement only);
    and how many training images were held out."""
    from ..deploy.calibration import held_out, preprocess_records
    from ..deploy.gate import GateImages
    from ..features.datasets import open_dataset

    model = run.models["target"]
    if "test" in run.splits:
        records = open_dataset(run.splits["test"], run.classes).records
        labels = np.array([record.label for record in records])
        return GateImages(preprocess_records(model, records).numpy(), labels, run.task.data.base_classes,
                          "test images"), 0
    pixels = held_out(model, run.splits["train"], run.recipe.export.calibration.seed)
    return GateImages(pixels.numpy(), None, description=f"{len(pixels)} held-out training images (agreement "
                                                        "only: the recipe has no test images)"), len(pixels)


def _drop_unasked(run: _Run) -> None:
    """Calibrated graphs an earlier run added that this recipe no longer asks for leave the export."""
    from ..deploy.onnx_export import remove_precision

    for name, entry in PRECISIONS.items():
        if entry.needs_calibration and name not in run.precisions and remove_precision(run.onnx_dir, entry):
            run.log(f"removed the {name} graphs from {run.onnx_dir} (the recipe no longer asks for {name})")
            (run.out / "gates" / f"{name}.json").unlink(missing_ok=True)
            run.steps.forget(f"onnx-{name}")


def _references(run: _Run):
    """What the onnx step's PyTorch run computed on the parity images (pixels, outputs)."""
    from ..deploy.onnx_export import References

    record = read_json(run.out / REFERENCES / "references.json", "parity references")
    tensors = load_tensors(run.out / REFERENCES / "parity.safetensors", record.get("parity.safetensors"),
                           "parity references")
    return References(tensors["pixels"].numpy(), tensors["outputs"].numpy())


def _calibrated(run: _Run, name: str, outcome: ExportOutcome):
    """A calibrated precision (int8) added to the export behind its accuracy gate; returns the
    gate's failure (reported, then raised by run_export) or None."""
    from ..deploy.calibration import sample_calibration
    from ..deploy.gate import GateFailed
    from ..deploy.onnx_export import add_precision, calibration_inputs

    from ..deploy.onnx_export import resolve_external_data_threshold

    target, settings = PRECISIONS[name], run.recipe.export.calibration
    threshold = resolve_external_data_threshold(run.recipe.export.external_data_threshold)
    source = settings.data or run.splits["train"]
    gate_file = run.out / "gates" / f"{name}.json"

    def work() -> None:
        gate_file.parent.mkdir(parents=True, exist_ok=True)
        gate, held = _gate_images(run)
        model = run.models["target"]
        calibration = sample_calibration(model, source, settings.images, settings.minimum, settings.seed,
                                         exclude=held if settings.data is None else 0)
        try:
            result = add_precision(run.onnx_dir, target, calibration_inputs(model, calibration.pixels),
                                   _references(run), calibration.record, gate, run.log, threshold)
        except GateFailed as exc:
            write_json(gate_file, exc.record)
            raise
        write_json(gate_file, result)

    inputs = {"onnx": run.keys["onnx"], "settings": asdict(settings),
              "data": tree_sha256(settings.data) if settings.data else run.split_keys["train"],
              "gate": run.split_keys.get("test"), "base_classes": run.task.data.base_classes}
    _key_external_data(inputs, threshold)
    try:
        run.keys[f"onnx-{name}"] = run.steps.run(f"onnx-{name}", inputs,
                                                 [run.onnx_dir / target.graph_name("model"), gate_file], work)
        failure = None
    except GateFailed as exc:
        run.steps.failed(f"onnx-{name}", str(exc))
        failure = exc
    outcome.gates.append(read_json(gate_file, f"{name} gate"))
    return failure


def _pixel_graphs(run: _Run) -> list[str]:
    """The exported pixels -> outputs graphs, one per precision (and a bank's backbone graphs)."""
    files = read_json(run.onnx_dir / "manifest.json", "export manifest")["files"]
    return sorted(name for name in files if name.startswith(("model", "backbone")) and name.endswith(".onnx"))


def _engines(run: _Run) -> list[str]:
    """One engine per exported pixels graph, over the recipe's batch range; returns the engine
    steps' keys (empty where none could be built: then each manifest holds a trtexec command)."""
    from ..runtimes.tensorrt import BatchProfile, build_engine, manifest_path, tensorrt_available

    if "tensorrt" not in run.recipe.runtimes:
        return []
    export = run.recipe.export
    profile = BatchProfile(export.batch.min, export.batch.opt, export.batch.max)
    files = read_json(run.onnx_dir / "manifest.json", "export manifest")["files"]
    keys = []
    for graph in _pixel_graphs(run):
        engine = run.out / "engines" / graph.replace(".onnx", ".engine")
        reason = tensorrt_available()
        if reason is not None:
            if not _command_recorded(engine, files[graph]["sha256"], profile, export.workspace_mib):
                try:
                    build_engine(run.onnx_dir / graph, engine, profile, export.workspace_mib)
                except DependencyError:
                    pass  # expected here: the manifest now holds the trtexec command
            run.steps.unavailable(f"tensorrt-{graph}", f"{reason}; trtexec command in {manifest_path(engine)}")
            continue
        inputs = {"onnx": files[graph]["sha256"], "profile": asdict(profile), "workspace_mib": export.workspace_mib}
        if files[graph].get("external_data"):  # the weights an engine is built from are in them
            inputs["external_data"] = [files[name]["sha256"] for name in files[graph]["external_data"] if name in files]
        keys.append(run.steps.run(
            f"tensorrt-{graph}", inputs,
            [engine, manifest_path(engine)],
            lambda graph=graph, engine=engine: build_engine(run.onnx_dir / graph, engine, profile,
                                                            export.workspace_mib)))
    return keys


def _command_recorded(engine: Path, onnx_sha256: str, profile, workspace_mib: int) -> bool:
    """Whether the manifest beside ``engine`` already holds the trtexec command for this graph,
    profile and workspace: then it is left as it is, byte for byte (a bank's unchanged backbone)."""
    from ..runtimes.tensorrt import manifest_path

    try:
        record = read_json(manifest_path(engine), "engine manifest")
    except InputError:
        return False
    return (record.get("built") is False and record.get("onnx_sha256") == onnx_sha256
            and record.get("profile") == asdict(profile) and record.get("workspace_mib") == workspace_mib)


def _candidates(run: _Run, input_shape: tuple, module: Callable, graphs: list[str]) -> tuple[list, list[str]]:
    """A runner (not yet active) for every registered runtime the recipe names, other than the
    reference: ``module`` (a zero-argument builder of the PyTorch module) for module runtimes,
    each of ``graphs`` (in the export directory) or its engine for the others; and why each
    unavailable runtime is not run."""
    from ..runtimes.base import InputSpec

    candidates, skipped = [], []
    for entry in RUNTIMES.values():
        if entry.reference or entry.family not in run.recipe.runtimes:
            continue
        reason = entry.unavailable()
        if reason is not None:
            skipped.append(f"{entry.name}: {reason}")
            continue
        if entry.loads == "module":
            candidates.append(entry.create(module, input_spec=InputSpec("pixel_values", input_shape)))
        elif entry.loads == "onnx":
            candidates += [entry.create(run.onnx_dir / graph) for graph in graphs]
        else:  # "engine"
            candidates += [entry.create(run.out / "engines" / graph.replace(".onnx", ".engine")) for graph in graphs]
    return candidates, skipped


def _validate(run: _Run, engine_keys: list[str]) -> tuple[list[dict], list[str]]:
    """Every available runtime against the PyTorch outputs the onnx step computed, one runner
    active at a time."""
    from ..runtimes.compare import judge
    from ..runtimes.onnxruntime import available_providers

    def validate() -> None:
        references = _references(run)
        pixels, expected = references.pixels, references.outputs
        def classifier():
            from ..deploy.fusion import DeployedClassifier, FoldedHead

            return DeployedClassifier(run.models["target"].model.visual,
                                      FoldedHead(run.head("target"), run.adapter(run.final_stage)),
                                      softmax=run.recipe.export.softmax)

        candidates, skipped = _candidates(run, (None, *pixels.shape[1:]), classifier, _pixel_graphs(run))
        rows = []
        for candidate in candidates:
            with candidate:
                rows.append({"graph": candidate.graph, **judge(reference_runtime().name, expected, candidate,
                                                                candidate.infer(pixels), pixels.shape[0])})
        write_json(run.out / "validation.json", {"images": int(pixels.shape[0]), "rows": rows, "skipped": skipped})

    run.steps.run("validate", {"onnx": [run.keys.get(k) for k in sorted(run.keys) if k.startswith("onnx")],
                               "engines": engine_keys, "runtimes": list(run.recipe.runtimes),
                               "providers": available_providers()}, [run.out / "validation.json"], validate)
    validation = read_json(run.out / "validation.json", "validation table")
    return validation["rows"], validation.get("skipped", [])
