"""`transmiter export RECIPE`: a recipe run end to end, step by step, incrementally.

Steps: data -> feature caches -> heads -> extract -> transfer -> TransMiter+
-> evaluate -> ONNX (fp32 / fp16, parity) -> TensorRT engines -> report.
Each step has a key, the sha256 of everything it reads (recipe values, file
contents, the keys of the steps before it); a step whose key matches its
record from the previous run and whose outputs exist is skipped, so a re-run
redoes only what changed (``force`` redoes everything). Every step writes its
outputs atomically, so a failure leaves the previous outputs and every
completed step usable. One run at a time per output directory (a lock file).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .artifacts import atomic_directory, read_json, sha256_file, write_json
from .errors import DependencyError, InputError
from .recipe import ModelRef, Recipe
from .runners import tensorrt_available

REPORT_FORMAT = "transmiter-export-report"


@dataclass
class StepRecord:
    name: str
    status: str  # "ran" | "skipped" (unchanged) | "unavailable" (needs what this host lacks)
    seconds: float
    detail: str = ""


@dataclass
class ExportOutcome:
    out_dir: Path
    steps: list[StepRecord] = field(default_factory=list)
    accuracy: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    validation_skipped: list[str] = field(default_factory=list)
    export_dir: Path | None = None


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Steps:
    """Runs named steps, skipping those whose inputs are unchanged since the last run."""

    def __init__(self, out_dir: Path, force: bool, log: Callable[[str], None]) -> None:
        self.records_dir = out_dir / ".steps"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.force, self.log = force, log
        self.done: list[StepRecord] = []

    def run(self, name: str, inputs: dict[str, Any], outputs: list[Path], work: Callable[[], Any]) -> str:
        key = _key({"step": name, **inputs})
        record = self.records_dir / f"{name}.json"
        if not self.force and record.is_file() and all(path.exists() for path in outputs):
            try:
                previous = read_json(record, "step record")
            except InputError:
                previous = {}
            if previous.get("key") == key:
                self.done.append(StepRecord(name, "skipped", 0.0,
                                            f"inputs unchanged (took {previous.get('seconds', 0.0):.1f} s when it ran)"))
                self.log(f"[skip] {name} (inputs unchanged)")
                return key
        self.log(f"[run ] {name}")
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        write_json(record, {"key": key, "seconds": seconds})
        self.done.append(StepRecord(name, "ran", seconds))
        return key

    def unavailable(self, name: str, reason: str) -> None:
        self.done.append(StepRecord(name, "unavailable", 0.0, reason))
        self.log(f"[skip] {name}: {reason}")


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One export per output directory: a second concurrent run is refused, not interleaved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(f"another transmiter export is writing to {out_dir}; wait for it to finish") from exc
        yield
    finally:
        handle.close()


def _remove_stale_staging(out: Path, log: Callable[[str], None]) -> None:
    """Staging directories left by a run that was killed (SIGKILL, power loss) never became
    artifacts; under the lock no other export can be using them, so they go."""
    for stale in sorted([*out.rglob(".*.partial"), *out.rglob(".*.old")], reverse=True):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            log(f"removed {stale} (left by an interrupted run)")


def model_specs(recipe: Recipe) -> dict[str, Any]:
    """The ModelSpec of source, teacher and target; the shipped demo weights are verified once."""
    from .demo.weights import demo_model_spec, shipped_weights_dir, verify_weights
    from .models import ModelSpec

    refs: dict[str, ModelRef] = {"source": recipe.source, "teacher": recipe.finetuned, "target": recipe.target}
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


def _tree_sha256(path: Path) -> str:
    """Content hash of a file or of every file under a directory (relative paths and bytes)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


class _Models:
    """Loads each model on first use only: a fully incremental re-run loads none."""

    def __init__(self, specs: dict[str, Any]) -> None:
        self.specs = specs
        self.loaded: dict[str, Any] = {}

    def __getitem__(self, tag: str):
        from .models import load_model

        if tag not in self.loaded:
            self.loaded[tag] = load_model(self.specs[tag])
        return self.loaded[tag]


def _prepare_data(recipe: Recipe, out: Path, steps: Steps, progress: bool) -> tuple[
        dict[str, Path], dict[str, str], list[str], tuple[str, ...] | None, list[str] | None]:
    """Split locations, their content keys, the class names, the demo templates and vocabulary."""
    data = recipe.data
    if data.demo_task is not None:
        from .demo import tasks as demo_tasks
        from .demo import world as demo_world
        from .demo.tasks import auxiliary_phrases, get_task, write_split

        task = get_task(data.demo_task)
        root = out / "data"
        sizes = {"train": data.train_per_class, "fewshot": recipe.plus.shots, "test": data.test_per_class}
        renderer = {name: sha256_file(Path(module.__file__)) for name, module in
                    (("world", demo_world), ("tasks", demo_tasks))}

        def render() -> None:
            with atomic_directory(root, "data.json") as staging:
                for split, per_class in sizes.items():
                    write_split(task, split, staging / split, per_class, progress=progress)
                write_json(staging / "data.json", {"demo_task": task.name, "per_class": sizes})

        key = steps.run("data", {"task": task.name, "sizes": sizes, "renderer": renderer}, [root / "data.json"], render)
        return ({split: root / split for split in sizes}, {split: key for split in sizes}, list(task.classes),
                task.templates, auxiliary_phrases())
    if data.classes is not None:
        classes = list(data.classes)
    else:
        classes = [line.strip() for line in data.classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    splits = {split: getattr(data, split) for split in ("train", "fewshot", "test") if getattr(data, split) is not None}
    return splits, {split: _tree_sha256(path) for split, path in splits.items()}, classes, None, None


def run_export(recipe: Recipe, out_dir: Path, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> ExportOutcome:
    """Run a validated recipe; returns what ran, what was skipped and why, and the accuracy table."""
    out = Path(out_dir)
    with _exclusive(out):
        _remove_stale_staging(out, log)
        steps = Steps(out, force, log)
        outcome = ExportOutcome(out)
        _run_steps(recipe, out, steps, outcome, progress, log)
        outcome.steps = steps.done
        write_report(recipe, outcome)
    return outcome


def _run_steps(recipe: Recipe, out: Path, steps: Steps, outcome: ExportOutcome, progress: bool,
               log: Callable[[str], None]) -> None:
    from .adapter_artifact import load_adapter, save_adapter
    from .cache import build_cache, load_cache, zero_shot_logits
    from .datasets import open_dataset
    from .evaluation import base_to_novel
    from .heads import build_head, load_head, save_head
    from .phases import extract_adapter, plus_adapter, transfer_adapter
    from .plus import PlusSettings
    from .templates import resolve_templates
    from .vocabulary import select_auxiliary

    splits, split_keys, classes, task_templates, demo_vocabulary = _prepare_data(recipe, out, steps, progress)
    specs = model_specs(recipe)
    models = _Models(specs)
    keys = {tag: model_key(spec) for tag, spec in specs.items()}

    # ---- feature caches: the models see each image once
    needed = [("source", "train"), ("teacher", "train"), ("target", "train")]
    if recipe.plus.enabled:
        needed.append(("target", "fewshot"))
    if "test" in splits:
        needed += [("source", "test"), ("teacher", "test"), ("target", "test")]
    cache_keys = {}
    for tag, split in needed:
        where = out / "caches" / f"{tag}-{split}"
        cache_keys[tag, split] = steps.run(
            f"cache-{tag}-{split}", {"model": keys[tag], "data": split_keys[split], "classes": classes},
            [where / "cache.json"],
            lambda tag=tag, split=split, where=where: build_cache(
                models[tag], open_dataset(splits[split], classes), where, progress=progress))

    # ---- zero-shot heads over the task classes (+ auxiliary classes for source and target)
    head_recipe = recipe.head
    templates = resolve_templates(head_recipe.templates) if head_recipe.templates is not None else (
        task_templates or resolve_templates("simple"))
    if head_recipe.auxiliary_vocabulary is not None:
        vocabulary = [line.strip() for line in head_recipe.auxiliary_vocabulary.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    else:
        vocabulary = demo_vocabulary
    auxiliary = select_auxiliary(classes, head_recipe.logit_width, head_recipe.seed, vocabulary=vocabulary)
    head_keys = {}
    for tag in ("source", "teacher", "target"):
        where = out / "heads" / tag
        names = [] if tag == "teacher" else auxiliary
        head_keys[tag] = steps.run(
            f"head-{tag}", {"model": keys[tag], "classes": classes, "auxiliary": names, "templates": templates},
            [where / "head.json"],
            lambda tag=tag, where=where, names=names: save_head(
                build_head(models[tag], classes, names, templates, progress=progress), where))

    def cache(tag: str, split: str):
        return load_cache(out / "caches" / f"{tag}-{split}")

    def head(tag: str):
        return load_head(out / "heads" / tag)

    # ---- the three phases
    adapters = out / "adapters"
    extraction = recipe.extraction
    extract_key = steps.run(
        "extract", {"caches": [cache_keys["source", "train"], cache_keys["teacher", "train"]],
                    "heads": [head_keys["source"], head_keys["teacher"]], "adapter": asdict(recipe.adapter),
                    "settings": extraction.to_dict()},
        [adapters / "extracted" / "adapter.json"],
        lambda: save_adapter(extract_adapter(
            cache("source", "train"), head("source"), cache("teacher", "train"), head("teacher"),
            recipe.adapter.latent_dim, recipe.adapter.mlp_ratio, recipe.adapter.num_layers,
            extraction, progress=progress)[0], adapters / "extracted"))
    transfer_key = steps.run(
        "transfer", {"extract": extract_key, "caches": [cache_keys["source", "train"], cache_keys["target", "train"]],
                     "heads": [head_keys["source"], head_keys["target"]], "settings": asdict(recipe.transfer)},
        [adapters / "transferred" / "adapter.json"],
        lambda: save_adapter(transfer_adapter(
            load_adapter(adapters / "extracted"), cache("source", "train"), head("source"), cache("target", "train"),
            head("target"), recipe.transfer.regularisation, recipe.transfer.lambda_mode)[0], adapters / "transferred"))
    final_stage, final_key = "transferred", transfer_key
    if recipe.plus.enabled:
        plus = recipe.plus
        settings = PlusSettings(epochs=plus.epochs, batch_size=plus.batch_size, lr=plus.lr,
                                keep_orthogonal=plus.keep_orthogonal, seed=extraction.seed)
        final_stage = "plus"
        final_key = steps.run(
            "plus", {"transfer": transfer_key, "cache": cache_keys["target", "fewshot"], "head": head_keys["target"],
                     "shots": plus.shots, "settings": settings.to_dict()},
            [adapters / "plus" / "adapter.json"],
            lambda: save_adapter(plus_adapter(load_adapter(adapters / "transferred"), cache("target", "fewshot"),
                                              head("target"), plus.shots, settings, progress=progress)[0],
                                 adapters / "plus"))

    # ---- accuracy on the labelled test images
    if "test" in splits:
        def evaluate() -> None:
            test_labels = cache("target", "test").labels
            k = len(classes)
            target_logits = zero_shot_logits(cache("target", "test"), head("target"))
            rows = {
                "source zero-shot": zero_shot_logits(cache("source", "test"), head("source"))[:, :k],
                "source fine-tuned": zero_shot_logits(cache("teacher", "test"), head("teacher")),
                "target zero-shot": target_logits[:, :k],
            }
            with torch.no_grad():
                for stage, label in (("transferred", "target + TransMiter"), ("plus", "target + TransMiter+")):
                    if (adapters / stage / "adapter.json").is_file() and (stage != "plus" or recipe.plus.enabled):
                        rows[label] = load_adapter(adapters / stage).adapter.task_logits(target_logits)
            table = [{"model": name, **base_to_novel(logits, test_labels, recipe.data.base_classes)}
                     for name, logits in rows.items()]
            write_json(out / "accuracy.json", {"rows": table})

        steps.run("evaluate", {"caches": [cache_keys[tag, "test"] for tag in ("source", "teacher", "target")],
                               "adapters": [transfer_key, final_key], "base_classes": recipe.data.base_classes},
                  [out / "accuracy.json"], evaluate)
        outcome.accuracy = read_json(out / "accuracy.json", "accuracy table")["rows"]

    # ---- ONNX: the adapter fused into the target's head, verified against PyTorch
    from .onnx_export import ExportSettings, export_deployment, parity_pixels

    export = recipe.export
    fp16 = "fp16" in export.precisions
    if fp16 and importlib.util.find_spec("modelopt") is None:
        steps.unavailable("onnx-fp16", "nvidia-modelopt is not installed (pip install 'transmiter-deploy[fp16]'); "
                                       "exporting fp32 only")
        fp16 = False
    onnx_dir = out / "onnx"
    images = splits.get("test") or splits["train"]
    onnx_key = steps.run(
        "onnx", {"adapter": final_key, "target": keys["target"], "head": head_keys["target"], "opset": export.opset,
                 "softmax": export.softmax, "fp16": fp16, "images": split_keys.get("test") or split_keys["train"]},
        [onnx_dir / "manifest.json"],
        lambda: export_deployment(models["target"], head("target"), load_adapter(adapters / final_stage), onnx_dir,
                                  parity_pixels(models["target"], images, count=16),
                                  ExportSettings(opset=export.opset, softmax=export.softmax, fp16=fp16),
                                  log=log))
    outcome.export_dir = onnx_dir

    # ---- TensorRT engines, where TensorRT and a GPU exist (else their manifests hold trtexec commands)
    engine_keys = _engines(recipe, out, onnx_dir, steps)

    # ---- every available runtime against PyTorch, on the same images
    def validate() -> None:
        from .fusion import DeployedClassifier, FoldedHead
        from .runners import InputSpec, OnnxRuntimeRunner, TorchRunner, compare, onnxruntime_providers

        model = models["target"]
        size = model.preprocess_config["image_size"]
        height, width = (size, size) if isinstance(size, int) else size
        classifier = DeployedClassifier(model.model.visual, FoldedHead(head("target"), load_adapter(adapters / final_stage)),
                                        softmax=export.softmax)
        reference = TorchRunner(classifier, InputSpec("pixel_values", (None, 3, height, width)))
        pixels = parity_pixels(model, images, count=16).numpy()
        graphs = sorted(name for name in read_json(onnx_dir / "manifest.json", "export manifest")["files"]
                        if name.startswith("model"))
        candidates, skipped = [], []
        if "pytorch" in recipe.runtimes:
            if torch.cuda.is_available():
                import copy

                candidates.append(TorchRunner(copy.deepcopy(classifier), reference.input_spec, device="cuda"))
            else:
                skipped.append("pytorch-cuda: no CUDA GPU is visible")
        if "onnxruntime" in recipe.runtimes:
            available = onnxruntime_providers()
            for provider, ort_name in OnnxRuntimeRunner.PROVIDERS.items():
                # ORT's TensorRT provider needs ORT >= 1.27 for TensorRT 11 (DESIGN.md section 4): the
                # engines are validated through our own TensorRT runner instead
                if provider == "tensorrt" or ort_name not in available:
                    continue
                for graph in graphs:
                    try:
                        candidates.append(OnnxRuntimeRunner(onnx_dir / graph, provider))
                    except DependencyError as exc:
                        skipped.append(f"onnxruntime-{provider}: {exc}")
                        log(f"[skip] validate on onnxruntime-{provider}: {exc}")
                        break
        if "tensorrt" in recipe.runtimes:
            if tensorrt_available() is None:
                from .tensorrt_engine import TensorRTRunner

                candidates += [TensorRTRunner(out / "engines" / graph.replace(".onnx", ".engine")) for graph in graphs]
            else:
                skipped.append(f"tensorrt: {tensorrt_available()}")
        rows = [{"graph": c.graph, **compare(reference, c, pixels)} for c in candidates]
        write_json(out / "validation.json", {"images": int(pixels.shape[0]), "rows": rows, "skipped": skipped})

    steps.run("validate", {"onnx": onnx_key, "engines": engine_keys, "runtimes": list(recipe.runtimes),
                           "providers": _providers()}, [out / "validation.json"], validate)
    validation = read_json(out / "validation.json", "validation table")
    outcome.validation, outcome.validation_skipped = validation["rows"], validation.get("skipped", [])


def _providers() -> list[str]:
    from .runners import onnxruntime_providers

    return onnxruntime_providers()


def _engines(recipe: Recipe, out: Path, onnx_dir: Path, steps: Steps) -> list[str]:
    """One engine per exported pixels graph (fp32 and mixed fp16), over the recipe's batch range;
    returns the engine steps' keys (empty where none could be built)."""
    from .tensorrt_engine import BatchProfile, build_engine, manifest_path

    if "tensorrt" not in recipe.runtimes:
        return []
    keys = []
    batch = recipe.export.batch
    profile = BatchProfile(batch.min, batch.opt, batch.max)
    export_manifest = read_json(onnx_dir / "manifest.json", "export manifest")
    for graph in sorted(name for name in export_manifest["files"] if name.startswith("model")):
        engine = out / "engines" / graph.replace(".onnx", ".engine")
        reason = tensorrt_available()
        if reason is not None:
            try:
                build_engine(onnx_dir / graph, engine, profile, recipe.export.workspace_mib)
            except DependencyError:
                pass  # expected here: the manifest now holds the trtexec command
            steps.unavailable(f"tensorrt-{graph}", f"{reason}; trtexec command in {manifest_path(engine)}")
            continue
        keys.append(steps.run(f"tensorrt-{graph}", {"onnx": export_manifest["files"][graph]["sha256"], "profile": asdict(profile),
                                        "workspace_mib": recipe.export.workspace_mib},
                  [engine, manifest_path(engine)],
                  lambda graph=graph, engine=engine: build_engine(onnx_dir / graph, engine, profile,
                                                                  recipe.export.workspace_mib)))
    return keys


def write_report(recipe: Recipe, outcome: ExportOutcome) -> None:
    """report.json and report.md: accuracy, parity, MACs, and every step's status and time."""
    out = outcome.out_dir
    parity = read_json(outcome.export_dir / "parity.json", "parity report") if outcome.export_dir else None
    payload = {
        "format": REPORT_FORMAT, "format_version": 1, "recipe": str(recipe.path), "name": recipe.name,
        "steps": [asdict(step) for step in outcome.steps], "accuracy": outcome.accuracy, "parity": parity,
        "validation": outcome.validation, "validation_skipped": outcome.validation_skipped,
    }
    write_json(out / "report.json", payload)
    lines = [f"# Export report: {recipe.name}", "", f"Recipe: `{recipe.path}`. Artifacts: `{outcome.export_dir}`.", ""]
    if outcome.accuracy:
        lines += ["## Accuracy (test images)", "", "| model | base | novel | HM | all |", "| --- | ---: | ---: | ---: | ---: |"]
        cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines += [f"| {r['model']} | {cell(r['base'])} | {cell(r['novel'])} | {cell(r['hm'])} | {cell(r['all'])} |"
                  for r in outcome.accuracy]
        lines.append("")
    if parity:
        lines += ["## Parity (ONNX Runtime CPU vs PyTorch)", "",
                  "| check | max abs | top-1 agreement | criterion | result |", "| --- | ---: | ---: | --- | --- |"]
        for name, c in parity["checks"].items():
            verdict = ("pass" if c["passed"] else "FAIL") + ("" if c["required"] else " (reported)")
            lines.append(f"| {name} | {c['max_abs']:.2e} | {c['top1_agreement']:.2%} | {c['criterion']} | {verdict} |")
        macs = parity["macs"]
        lines += ["", "## Cost (multiply-accumulates at batch 1)", "", "| component | MACs |", "| --- | ---: |",
                  f"| backbone | {macs['model'].get('backbone', 0):,} |",
                  f"| head + adapter (folded) | {macs['model'].get('head+adapter', 0):,} |",
                  f"| head + adapter, unfolded reference | {macs['head_unfolded']:,} |",
                  f"| overhead | {macs['overhead_percent']:.4f}% of the backbone |", ""]
    if outcome.validation:
        lines += ["## Runtimes against PyTorch (same images)", "",
                  "| runtime | graph | precision | max abs | top-1 agreement | result |",
                  "| --- | --- | --- | ---: | ---: | --- |"]
        lines += [f"| {r['candidate']} | {r['graph']} | {r['precision']} | {r['max_abs']:.2e} | "
                  f"{r['top1_agreement']:.2%} | {'pass' if r['passed'] else 'FAIL'} |" for r in outcome.validation]
        lines += ["", *(f"Not run here: {reason}." for reason in outcome.validation_skipped), ""]
    lines += ["## Steps", "", "| step | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in outcome.steps]
    staging = out / ".report.md.tmp"
    staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(staging, out / "report.md")
