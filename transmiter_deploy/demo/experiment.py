"""The whole method on one demo task, through the library's real code paths.

Renders the task's splits to image folders, caches features for the weak
source, its fine-tuned copy and the target, builds heads, then runs
extraction, transfer, TransMiter+ and base-to-novel evaluation, returning one
row per model: zero-shot source, fine-tuned source, zero-shot target,
target + TransMiter, target + TransMiter+, and target + EFT (logit
arithmetic with both source towers at inference, the method compared against).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..method.adapter import AdapterConfig
from ..features.cache import build_cache, check_same_images, load_cache, zero_shot_logits
from ..features.datasets import open_dataset
from ..method.eft import eft_logits
from ..method.evaluation import base_to_novel
from ..method.extraction import ExtractionSettings, extract
from ..features.heads import build_head
from ..features.models import load_model
from ..method.plus import PlusSettings, few_shot_indices, train_plus
from ..method.transfer import transfer
from ..features.vocabulary import select_auxiliary
from .tasks import DemoTask, auxiliary_phrases, write_split
from .weights import SOURCE, TARGET, demo_model_spec, finetuned_name


@dataclass(frozen=True)
class ExperimentSettings:
    train_per_class: int = 500
    test_per_class: int = 100
    eval_split: str = "test"  # "val" while choosing settings
    # The reference runs base-to-novel with --use_all_train: the unlabelled images show every
    # class (no labels are read). False restricts them to base classes.
    unlabelled_all_classes: bool = True
    shots: int = 4
    logit_width: int = 128
    extraction_epochs: int = 10
    plus_epochs: int = 20
    regularisation: float = 500.0
    seed: int = 0


def run_task(task: DemoTask, weights_dir: Path, work_dir: Path,
             settings: ExperimentSettings = ExperimentSettings(), progress: bool = False) -> list[dict]:
    work_dir = Path(work_dir)
    splits = {}
    for split, per_class, base_only in (("train", settings.train_per_class, not settings.unlabelled_all_classes),
                                        ("fewshot", settings.shots, False),
                                        (settings.eval_split, settings.test_per_class, False)):
        folder = work_dir / "data" / split
        if not folder.exists():
            write_split(task, split, folder, per_class, seed=settings.seed, base_only=base_only)
        splits[split] = open_dataset(folder, list(task.classes))

    source = load_model(demo_model_spec(weights_dir, SOURCE))
    teacher = load_model(demo_model_spec(weights_dir, finetuned_name(task.name)))
    target = load_model(demo_model_spec(weights_dir, TARGET))

    def cache(model, split, tag):
        out = work_dir / "caches" / f"{tag}-{split}"
        if not (out / "cache.json").exists():
            build_cache(model, splits[split], out, progress=progress)
        return load_cache(out)

    classes = list(task.classes)
    auxiliary = select_auxiliary(classes, settings.logit_width, settings.seed, vocabulary=auxiliary_phrases())
    heads = {
        "source": build_head(source, classes, auxiliary, task.templates, progress=progress),
        "teacher": build_head(teacher, classes, [], task.templates, progress=progress),
        "target": build_head(target, classes, auxiliary, task.templates, progress=progress),
    }
    models = {"source": source, "teacher": teacher, "target": target}
    caches = {(tag, split): cache(model, split, tag) for tag, model in models.items() for split in ("train", settings.eval_split)}
    caches[("target", "fewshot")] = cache(target, "fewshot", "target")
    for tag in ("teacher", "target"):  # extraction and transfer pair rows: same images, same order
        check_same_images(caches[("source", "train")], caches[(tag, "train")])
    logits = {key: zero_shot_logits(features, heads[key[0]]) for key, features in caches.items()}
    test = settings.eval_split
    test_labels = caches[("target", test)].labels
    fewshot_labels = caches[("target", "fewshot")].labels
    k = len(classes)

    config = AdapterConfig(num_task_classes=k, logit_width=settings.logit_width, latent_dim=settings.logit_width)
    adapter, _ = extract(logits[("source", "train")], logits[("teacher", "train")], config,
                         ExtractionSettings(epochs=settings.extraction_epochs, seed=settings.seed), progress=progress)
    moved = transfer(adapter, logits[("source", "train")], logits[("target", "train")],
                     regularisation=settings.regularisation).adapter
    chosen = few_shot_indices(fewshot_labels, settings.shots, settings.seed, num_classes=k)
    plus, _ = train_plus(moved, logits[("target", "fewshot")][chosen], fewshot_labels[chosen],
                         PlusSettings(epochs=settings.plus_epochs, seed=settings.seed), progress=progress)

    with torch.no_grad():
        rows = {
            "source zero-shot": logits[("source", test)][:, :k],
            "source fine-tuned": logits[("teacher", test)],
            "target zero-shot": logits[("target", test)][:, :k],
            "target + TransMiter": moved.task_logits(logits[("target", test)]),
            "target + TransMiter+": plus.task_logits(logits[("target", test)]),
            # the alternative transfer: needs both source towers at inference (see eft.py)
            "target + EFT": eft_logits(logits[("target", test)][:, :k], logits[("teacher", test)],
                                       logits[("source", test)][:, :k]),
        }
    return [{"task": task.name, "model": name, **base_to_novel(task_logits, test_labels)}
            for name, task_logits in rows.items()]
