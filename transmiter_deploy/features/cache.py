"""The feature cache: image features computed once, read by every later phase.

Layout of a cache directory::

    cache.json                     manifest: model identity, preprocessing, dataset
                                   fingerprint, class names, shard hashes, versions
    features-00000.safetensors     "features" (n, d) float32 L2-normalised, "labels" (n,) int64

Labels are class indices into the manifest's ``class_names`` (-1 = unlabelled).
The dataset fingerprint hashes every file's bytes, relative path and label in
order, so two caches with equal fingerprints hold the same images in the same
order: the pairing that transfer needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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
from .datasets import ImageDataset, PreprocessedImages
from ..errors import InputError, IntegrityError
from .heads import ZeroShotHead
from .models import LoadedModel, ModelIdentity

FORMAT = "transmiter-deploy/feature-cache"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["cache"]


@dataclass
class FeatureCache:
    features: torch.Tensor  # (N, d) float32
    labels: torch.Tensor  # (N,) int64, -1 = unlabelled
    class_names: list[str]
    model: ModelIdentity
    fingerprint: str
    location: Path

    def __len__(self) -> int:
        return self.features.shape[0]


def build_cache(
    model: LoadedModel,
    dataset: ImageDataset,
    out_dir: Path,
    batch_size: int = 64,
    shard_size: int = 8192,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Encode every image once and write the cache atomically."""
    if batch_size < 1 or shard_size < 1:
        raise InputError("batch size and shard size must be positive")
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(dataset, model.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        writer = CacheWriter(staging, dataset, shard_size, model.identity)
        bar = tqdm(total=len(dataset), desc=f"image tower {model.identity.name}", unit="img", disable=not progress)
        with bar:
            for pixels, _labels, digests in loader:
                writer.append(model.encode_images(pixels.to(device)).cpu(), digests)
                bar.update(len(digests))
        writer.finish(model.preprocess_config)
    return out_dir


class CacheWriter:
    """Writes a cache's shards and manifest into a staging directory, batch by batch in dataset
    order. Every engine (the local DataLoader, the Ray cluster) encodes however it likes and hands
    its batches here, so the files they write are the same."""

    def __init__(self, staging: Path, dataset: ImageDataset, shard_size: int, identity: ModelIdentity) -> None:
        if shard_size < 1:
            raise InputError("batch size and shard size must be positive")
        self.staging, self.dataset, self.shard_size, self.identity = Path(staging), dataset, shard_size, identity
        self.fingerprint = hashlib.sha256()
        self.shards: list[dict[str, Any]] = []
        self.pending_features: list[torch.Tensor] = []
        self.pending_labels: list[torch.Tensor] = []
        self.pending_rows = 0
        self.rows = 0  # records written so far: the next batch starts at this one
        self.feature_dim = 0

    def append(self, features: torch.Tensor, digests: list[str]) -> None:
        """The features of the next ``len(digests)`` records and the sha256 of each file's bytes."""
        records = self.dataset.records[self.rows : self.rows + len(digests)]
        if len(records) != len(digests) or features.shape[0] != len(digests):
            raise InputError(f"cache of {len(self.dataset)} images: a batch of {len(digests)} images and "
                             f"{features.shape[0]} features does not fit after {self.rows}")
        if not torch.isfinite(features).all():
            raise InputError(
                f"model {self.identity.describe()} produced non-finite features for a batch "
                f"starting at {records[0].relpath}"
            )
        for record, digest in zip(records, digests):
            self.fingerprint.update(f"{record.relpath}\t{record.label}\t{digest}\n".encode())
        self.rows += len(digests)
        self.feature_dim = features.shape[1]
        self.pending_features.append(features)
        self.pending_labels.append(torch.tensor([record.label for record in records], dtype=torch.int64))
        self.pending_rows += features.shape[0]
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        while self.pending_rows >= self.shard_size or (final and self.pending_rows > 0):
            features = torch.cat(self.pending_features)
            labels = torch.cat(self.pending_labels)
            take = min(self.shard_size, self.pending_rows)
            name = f"features-{len(self.shards):05d}.safetensors"
            digest = save_tensors(self.staging / name, {"features": features[:take], "labels": labels[:take]})
            self.shards.append({"file": name, "rows": take, "sha256": digest})
            self.pending_features, self.pending_labels = [features[take:]], [labels[take:]]
            self.pending_rows -= take

    def finish(self, preprocess_config: dict[str, Any]) -> None:
        """The last shard and the manifest; every record must have been appended."""
        if self.rows != len(self.dataset):
            raise InputError(f"cache of {len(self.dataset)} images: only {self.rows} were encoded")
        self._flush(final=True)
        manifest = {
            "model": self.identity.to_dict(),
            "preprocess": preprocess_config,
            "dataset": {**self.dataset.describe(), "fingerprint": self.fingerprint.hexdigest()},
            "class_names": self.dataset.class_names,
            "num_samples": len(self.dataset),
            "feature_dim": int(self.feature_dim),
            "shards": self.shards,
        }
        write_manifest(self.staging / MANIFEST, FORMAT, FORMAT_VERSION, manifest)


def load_cache(path: Path) -> FeatureCache:
    """Read and verify a cache: hashes, shapes, labels in range, finite features.
    A writer replacing it meanwhile: the old one or the new one, read whole."""
    return read_consistently(path, lambda: _load_cache(Path(path)))


def _load_cache(path: Path) -> FeatureCache:
    path = Path(path)
    manifest = read_manifest(path / MANIFEST, FORMAT, FORMAT_VERSION, "feature cache manifest")
    where = str(path / MANIFEST)
    require_keys(
        manifest,
        {"model": dict, "dataset": dict, "class_names": list, "num_samples": int,
         "feature_dim": int, "shards": list},
        where,
    )
    require_keys(manifest["dataset"], {"fingerprint": str}, f"{where} 'dataset'")
    features, labels = [], []
    for shard in manifest["shards"]:
        if not isinstance(shard, dict):
            raise IntegrityError(f"{where}: shard entries must be objects")
        require_keys(shard, {"file": str, "rows": int, "sha256": str}, f"{where} shard")
        if Path(shard["file"]).name != shard["file"]:
            raise IntegrityError(f"{where}: shard file name '{shard['file']}' must not contain a path")
        tensors = load_tensors(path / shard["file"], shard["sha256"], "feature shard")
        shard_features, shard_labels = tensors.get("features"), tensors.get("labels")
        if (
            shard_features is None
            or shard_labels is None
            or shard_features.ndim != 2
            or shard_features.shape != (shard["rows"], manifest["feature_dim"])
            or shard_labels.shape != (shard["rows"],)
        ):
            raise IntegrityError(f"{path / shard['file']}: tensors do not match the manifest's shapes")
        features.append(shard_features.float())
        labels.append(shard_labels.to(torch.int64))
    if not features:
        raise InputError(f"feature cache {path} holds no samples")
    cache = FeatureCache(
        features=torch.cat(features),
        labels=torch.cat(labels),
        class_names=list(manifest["class_names"]),
        model=ModelIdentity.from_dict(manifest["model"], where),
        fingerprint=manifest["dataset"]["fingerprint"],
        location=path,
    )
    if len(cache) != manifest["num_samples"]:
        raise IntegrityError(f"{where}: shards hold {len(cache)} samples, manifest says {manifest['num_samples']}")
    bad_rows = (~torch.isfinite(cache.features)).any(dim=1).nonzero().flatten()
    if len(bad_rows):
        raise InputError(f"feature cache {path} has NaN/inf features in {len(bad_rows)} samples (first: row {int(bad_rows[0])})")
    if ((cache.labels < -1) | (cache.labels >= len(cache.class_names))).any():
        raise IntegrityError(f"{where}: labels out of range for {len(cache.class_names)} classes")
    return cache


def check_same_images(first: FeatureCache, second: FeatureCache) -> None:
    """Transfer and distillation pair samples row by row: the images must be the same."""
    if first.fingerprint != second.fingerprint:
        raise InputError(
            f"caches {first.location} and {second.location} were built from different images "
            "(dataset fingerprints differ); pair caches of the same dataset"
        )


def zero_shot_logits(cache: FeatureCache, head: ZeroShotHead) -> torch.Tensor:
    """``features @ head.T`` after checking that cache and head belong together."""
    if cache.model != head.model:
        raise InputError(
            f"cache {cache.location} was made by {cache.model.describe()} but the head is for "
            f"{head.model.describe()}"
        )
    if cache.class_names and cache.class_names != head.class_names:
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(cache.class_names, head.class_names)) if a != b),
            min(len(cache.class_names), len(head.class_names)),
        )
        raise InputError(
            f"class lists differ: cache {cache.location} has {len(cache.class_names)} classes, the head "
            f"{len(head.class_names)}; first difference at index {mismatch}"
        )
    return head.logits(cache.features)
