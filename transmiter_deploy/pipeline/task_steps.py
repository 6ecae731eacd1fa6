"""A task's steps up to its adapter and accuracy table, as a single-task export and every task
of a bank run them: data, feature caches (an ONNX or precomputed teacher: its logits,
pipeline/teachers.py), heads, extract, transfer, TransMiter+, teacher check
(pipeline/teacher_check.py), evaluate. Each step is keyed by the content of what it reads
(pipeline/steps.py) and skipped when unchanged.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from ..artifacts import MANIFESTS, atomic_directory, read_json, sha256_file, write_json
from .export_run import ExportRun
from .steps import tree_sha256


def task_steps(run: ExportRun) -> list[dict]:
    """A task's steps up to its adapter and accuracy table (empty without test images): data,
    caches, heads, extract, transfer, TransMiter+, teacher check, evaluate. ``run.models`` is set."""
    from .teacher_check import teacher_check_step
    from .teachers import teacher_key

    if "teacher" not in run.model_keys:  # an ONNX or precomputed teacher: keyed by its files
        run.model_keys = {**run.model_keys, "teacher": teacher_key(run.task.finetuned)}
    data_step(run)
    _caches(run)
    _heads(run)
    _extract(run)
    _transfer(run)
    _plus(run)
    run.teacher_check = teacher_check_step(run)
    return _evaluate(run) if "test" in run.splits else []


def data_step(run: ExportRun) -> None:
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


def _caches(run: ExportRun) -> None:
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
                work, marker = (lambda split=split, where=where: _teacher_logits(run, split, where)), MANIFESTS["teacher_logits"]
            else:
                work, marker = (lambda tag=tag, split=split, where=where: build(tag, split, where)), MANIFESTS["cache"]
            run.cache_keys[tag, split] = run.steps.run(
                f"cache-{tag}-{split}", {"model": run.model_keys[tag], "data": run.split_keys[split], "classes": run.classes},
                [where / marker], work)


def _teacher_logits(run: ExportRun, split: str, where: Path) -> None:
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


def _heads(run: ExportRun) -> None:
    """Zero-shot heads over the task classes (+ auxiliary classes for source and target)."""
    from ..features.heads import build_head, save_head
    from ..features.models import stand_in_tokenizer_of
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
        stand_in = stand_in_tokenizer_of(run.models.specs[tag])
        run.head_keys[tag] = run.steps.run(
            f"head-{tag}", {"model": run.model_keys[tag], "classes": run.classes, "auxiliary": names,
                            "templates": templates, **({"stand_in_tokenizer": stand_in} if stand_in else {})},
            [where / MANIFESTS["head"]],
            lambda tag=tag, where=where, names=names: save_head(
                build_head(run.models[tag], run.classes, names, templates, progress=run.progress), where))


def head_templates(run: ExportRun) -> tuple[str, ...]:
    """The prompt templates of the task's heads: the recipe's, else the demo task's, else simple."""
    from ..features.templates import resolve_templates

    templates = run.task.head.templates
    return resolve_templates(templates) if templates is not None else (run.task_templates or resolve_templates("simple"))


def _extract(run: ExportRun) -> None:
    from ..features.adapter_artifact import save_adapter
    from .phases import extract_adapter_from_teacher

    recipe = run.task
    run.keys["extract"] = run.steps.run(
        "extract", {"caches": [run.cache_keys["source", "train"], run.cache_keys["teacher", "train"]],
                    "heads": [run.head_keys["source"], run.head_keys.get("teacher")], "adapter": asdict(recipe.adapter),
                    "settings": recipe.extraction.to_dict()},
        [run.adapters / "extracted" / MANIFESTS["adapter"]],
        lambda: save_adapter(extract_adapter_from_teacher(
            run.cache("source", "train"), run.head("source"), run.teacher("train"),
            recipe.adapter.latent_dim, recipe.adapter.mlp_ratio, recipe.adapter.num_layers,
            recipe.extraction, progress=run.progress, device=run.device)[0], run.adapters / "extracted"))


def _transfer(run: ExportRun) -> None:
    from ..features.adapter_artifact import save_adapter
    from .phases import transfer_adapter

    transfer = run.task.transfer
    run.keys["transfer"] = run.keys["final"] = run.steps.run(
        "transfer", {"extract": run.keys["extract"],
                     "caches": [run.cache_keys["source", "train"], run.cache_keys["target", "train"]],
                     "heads": [run.head_keys["source"], run.head_keys["target"]], "settings": asdict(transfer)},
        [run.adapters / "transferred" / MANIFESTS["adapter"]],
        lambda: save_adapter(transfer_adapter(
            run.adapter("extracted"), run.cache("source", "train"), run.head("source"), run.cache("target", "train"),
            run.head("target"), transfer.regularisation, transfer.lambda_mode)[0], run.adapters / "transferred"))


def _plus(run: ExportRun) -> None:
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
        [run.adapters / "plus" / MANIFESTS["adapter"]],
        lambda: save_adapter(plus_adapter(run.adapter("transferred"), run.cache("target", "fewshot"),
                                          run.head("target"), plus.shots, settings, progress=run.progress,
                                          device=run.device)[0],
                             run.adapters / "plus"))


def _evaluate(run: ExportRun) -> list[dict]:
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
                if (run.adapters / stage / MANIFESTS["adapter"]).is_file() and (stage != "plus" or recipe.plus.enabled):
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
