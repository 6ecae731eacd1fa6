"""A teacher's task logits on one image set: what extraction distils from.

An open_clip teacher's logits are computed from its feature cache and its head;
a teacher of any other kind (an ONNX classifier, a file of precomputed logits,
:mod:`transmiter_deploy.pipeline.teachers`) is stored as this artifact, one per
image set. Layout::

    teacher.json            manifest: the teacher (kind and content hash), dataset
                            fingerprint, class names, tensor hash, versions
    logits.safetensors      "logits" (n, K) float32 in dataset order, "labels" (n,) int64

The dataset fingerprint is computed exactly as a feature cache's, so the logits
pair row by row with the source model's cache of the same images
(:func:`~.cache.check_same_images`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (
    MANIFESTS,
    atomic_directory,
    load_tensors,
    read_consistently,
    read_manifest,
    require_keys,
    save_tensors,
    write_manifest,
)
from ..errors import InputError, IntegrityError

FORMAT = "transmiter-deploy/teacher-logits"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["teacher_logits"]
TENSORS = "logits.safetensors"


@dataclass
class TeacherLogits:
    logits: torch.Tensor  # (N, K) float32, task classes only
    labels: torch.Tensor  # (N,) int64, -1 = unlabelled
    class_names: list[str]
    teacher: dict[str, Any]  # {"kind": ..., and what identifies it: hashes, model identity}
    fingerprint: str  # of the images, as a feature cache's (features/cache.py)
    location: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logits.shape[0]


class Fingerprint:
    """The dataset fingerprint of :func:`~.cache.build_cache`, fed one image at a time: relative
    path, label and the sha256 of the file's bytes, in dataset order."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def add(self, relpath: str, label: int, sha256: str) -> None:
        self.digest.update(f"{relpath}\t{label}\t{sha256}\n".encode())

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def check_task_logits(logits: torch.Tensor, num_classes: int, what: str) -> None:
    """(N, K) with K the task's classes, every value finite; else one line naming ``what``."""
    if logits.ndim != 2:
        raise InputError(f"{what}: logits must be (N, K), got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise InputError(f"{what}: {logits.shape[1]} logits per image, but the task has {num_classes} classes")
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten()
    if len(bad):
        raise InputError(f"{what}: NaN/inf logits in {len(bad)} images (first: row {int(bad[0])})")


def save_teacher_logits(teacher: TeacherLogits, out_dir: Path) -> Path:
    """Write the artifact atomically (``extra`` goes into the manifest: an image set the teacher
    has no logits for is written empty, with ``unavailable`` saying why)."""
    check_task_logits(teacher.logits, len(teacher.class_names), f"teacher logits for {out_dir}")
    with atomic_directory(Path(out_dir), MANIFEST) as staging:
        digest = save_tensors(staging / TENSORS, {"logits": teacher.logits.float(),
                                                  "labels": teacher.labels.to(torch.int64)})
        write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, {
            "teacher": teacher.teacher, "class_names": teacher.class_names, "num_samples": len(teacher),
            "dataset": {"fingerprint": teacher.fingerprint}, "tensors": {"file": TENSORS, "sha256": digest},
            **teacher.extra})
    return Path(out_dir)


def load_teacher_logits(path: Path) -> TeacherLogits:
    """Read and verify the artifact (hash, shapes, finite logits, labels in range)."""
    return read_consistently(path, lambda: _load(Path(path)))


def _load(path: Path) -> TeacherLogits:
    where = str(path / MANIFEST)
    manifest = read_manifest(path / MANIFEST, FORMAT, FORMAT_VERSION, "teacher logits manifest")
    require_keys(manifest, {"teacher": dict, "class_names": list, "num_samples": int, "dataset": dict,
                            "tensors": dict}, where)
    require_keys(manifest["dataset"], {"fingerprint": str}, f"{where} 'dataset'")
    require_keys(manifest["tensors"], {"file": str, "sha256": str}, f"{where} 'tensors'")
    if manifest["tensors"]["file"] != TENSORS:
        raise IntegrityError(f"{where}: tensors file must be {TENSORS}")
    tensors = load_tensors(path / TENSORS, manifest["tensors"]["sha256"], "teacher logits")
    logits, labels = tensors.get("logits"), tensors.get("labels")
    num_classes = len(manifest["class_names"])
    if logits is None or labels is None or logits.shape != (manifest["num_samples"], num_classes) \
            or labels.shape != (manifest["num_samples"],):
        raise IntegrityError(f"{path / TENSORS}: tensors do not match the manifest's shapes")
    check_task_logits(logits.float(), num_classes, f"teacher logits {path}")
    labels = labels.to(torch.int64)
    if ((labels < -1) | (labels >= num_classes)).any():
        raise IntegrityError(f"{where}: labels out of range for {num_classes} classes")
    unavailable = manifest.get("unavailable")
    return TeacherLogits(logits.float(), labels, list(manifest["class_names"]), manifest["teacher"],
                         manifest["dataset"]["fingerprint"], path,
                         {"unavailable": unavailable} if isinstance(unavailable, str) else {})
