"""The three phases on artifacts: caches and heads in, a provenance-carrying adapter out.

``extraction.py``, ``transfer.py`` and ``plus.py`` compute on tensors; this
module checks that the artifacts fit together (same images, same model, same
class list), calls them, and records what went in. The CLI commands and the
recipe-driven export both go through here.
"""

from __future__ import annotations

from dataclasses import replace

from ..method.adapter import AdapterConfig
from ..features.adapter_artifact import AdapterArtifact, check_adapter_head, check_class_list
from ..features.cache import FeatureCache, check_same_images, zero_shot_logits
from ..errors import InputError
from ..method.extraction import ExtractionSettings, extract
from ..features.heads import ZeroShotHead
from ..features.teacher_logits import TeacherLogits
from ..method.plus import PlusSettings, few_shot_indices, train_plus
from ..method.transfer import TransferResult, transfer


def extract_adapter(source_cache: FeatureCache, source_head: ZeroShotHead, teacher_cache: FeatureCache,
                    teacher_head: ZeroShotHead, latent_dim: int | None = None, mlp_ratio: int = 4,
                    num_layers: int = 1, settings: ExtractionSettings = ExtractionSettings(),
                    progress: bool = True, device: str = "cpu") -> tuple[AdapterArtifact, list[float]]:
    """Phase 1 on the source, taught by an open_clip teacher (its cache and head), trained on
    ``device``: the adapter and its loss per epoch."""
    return extract_adapter_from_teacher(source_cache, source_head, checkpoint_teacher_logits(teacher_cache, teacher_head),
                                        latent_dim, mlp_ratio, num_layers, settings, progress, device)


def checkpoint_teacher_logits(teacher_cache: FeatureCache, teacher_head: ZeroShotHead) -> TeacherLogits:
    """An open_clip teacher's task logits on its cache's images (its head's task rows)."""
    logits = zero_shot_logits(teacher_cache, teacher_head)[:, : teacher_head.num_task_classes]
    return TeacherLogits(logits, teacher_cache.labels, teacher_head.class_names,
                         {"kind": "checkpoint", "model": teacher_head.model.to_dict(),
                          "head_sha256": teacher_head.weights_sha256},
                         teacher_cache.fingerprint, teacher_cache.location)


def extract_adapter_from_teacher(source_cache: FeatureCache, source_head: ZeroShotHead, teacher: TeacherLogits,
                                 latent_dim: int | None = None, mlp_ratio: int = 4, num_layers: int = 1,
                                 settings: ExtractionSettings = ExtractionSettings(),
                                 progress: bool = True, device: str = "cpu") -> tuple[AdapterArtifact, list[float]]:
    """Phase 1 on the source from a teacher of any kind (its task logits on the same images),
    trained on ``device``."""
    check_same_images(source_cache, teacher)
    if teacher.class_names != source_head.class_names:
        raise InputError("the teacher's classes differ from the source head's task classes")
    source_logits = zero_shot_logits(source_cache, source_head)
    width = len(source_head.all_class_names)
    config = AdapterConfig(num_task_classes=source_head.num_task_classes, logit_width=width,
                           latent_dim=latent_dim or width, mlp_ratio=mlp_ratio, num_layers=num_layers)
    adapter, history = extract(source_logits, teacher.logits, config, settings, progress=progress, device=device)
    # an open_clip teacher keeps the provenance keys adapters have always carried
    described = ({"teacher_model": teacher.teacher["model"], "teacher_head_sha256": teacher.teacher["head_sha256"]}
                 if teacher.teacher.get("kind") == "checkpoint" else {"teacher": teacher.teacher})
    artifact = AdapterArtifact(
        adapter=adapter,
        class_names=source_head.class_names,
        auxiliary_names=source_head.auxiliary_names,
        stage="extracted",
        source_model=source_head.model,
        provenance={"extraction": {
            "settings": settings.to_dict(),
            "num_samples": len(source_cache),
            "loss_per_epoch": history,
            "source_cache_fingerprint": source_cache.fingerprint,
            "source_head_sha256": source_head.weights_sha256,
            **described,
        }},
    )
    return artifact, history


def transfer_adapter(artifact: AdapterArtifact, source_cache: FeatureCache, source_head: ZeroShotHead,
                     target_cache: FeatureCache, target_head: ZeroShotHead, regularisation: float = 500.0,
                     lambda_mode: str = "sum") -> tuple[AdapterArtifact, TransferResult]:
    """Phase 2: the adapter moved onto the target model (closed form)."""
    check_adapter_head(artifact, source_head, "source head")
    check_class_list(artifact, target_head, "target head")
    check_same_images(source_cache, target_cache)
    result = transfer(artifact.adapter, zero_shot_logits(source_cache, source_head),
                      zero_shot_logits(target_cache, target_head), regularisation=regularisation,
                      lambda_mode=lambda_mode)
    moved = replace(
        artifact,
        adapter=result.adapter,
        stage="transferred",
        target_model=target_head.model,
        weights_sha256=None,
        provenance={**artifact.provenance, "transfer": {
            **result.provenance(),
            "source_head_sha256": source_head.weights_sha256,
            "target_head_sha256": target_head.weights_sha256,
            "cache_fingerprint": source_cache.fingerprint,
        }},
    )
    return moved, result


def plus_adapter(artifact: AdapterArtifact, labelled: FeatureCache, target_head: ZeroShotHead, shots: int | None,
                 settings: PlusSettings = PlusSettings(), progress: bool = True,
                 device: str = "cpu") -> tuple[AdapterArtifact, list[float], int]:
    """Phase 3 (TransMiter+, trained on ``device``): the refined adapter, its loss per epoch and
    the number of labelled samples."""
    check_adapter_head(artifact, target_head, "head")
    logits, labels = zero_shot_logits(labelled, target_head), labelled.labels
    if shots is not None:
        chosen = few_shot_indices(labels, shots, settings.seed, num_classes=len(artifact.class_names))
        logits, labels = logits[chosen], labels[chosen]
    refined, history = train_plus(artifact.adapter, logits, labels, settings, progress=progress, device=device)
    num_samples = int((labels >= 0).sum())
    result = replace(
        artifact,
        adapter=refined,
        stage="plus",
        weights_sha256=None,
        provenance={**artifact.provenance, "plus": {
            "settings": settings.to_dict(), "shots": shots, "num_samples": num_samples,
            "loss_per_epoch": history, "cache_fingerprint": labelled.fingerprint,
            "head_sha256": target_head.weights_sha256,
        }},
    )
    return result, history, num_samples
