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
MANIFEST = "cache.json"


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
    fingerprint = hashlib.sha256()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        shards: list[dict[str, Any]] = []
        pending_features: list[torch.Tensor] = []
        pending_labels: list[torch.Tensor] = []
        pending_rows = 0
        index = 0
        feature_dim = 0

        def flush(final: bool) -> None:
            nonlocal pending_features, pending_labels, pending_rows
            while pending_rows >= shard_size or (final and pending_rows > 0):
                features = torch.cat(pending_features)
                labels = torch.cat(pending_labels)
                take = min(shard_size, pending_rows)
                name = f"features-{len(shards):05d}.safetensors"
                digest = save_tensors(staging / name, {"features": features[:take], "labels": labels[:take]})
                shards.append({"file": name, "rows": take, "sha256": digest})
                pending_features, pending_labels = [features[take:]], [labels[take:]]
                pending_rows -= take

        bar = tqdm(total=len(dataset), desc=f"image tower {model.identity.name}", unit="img", disable=not progress)
        with bar:
            for pixels, labels, digests in loader:
                features = model.encode_images(pixels.to(device)).cpu()
                feature_dim = features.shape[1]
                if not torch.isfinite(features).all():
                    raise InputError(
                        f"model {model.identity.describe()} produced non-finite features for a batch "
                        f"starting at {dataset.records[index].relpath}"
                    )
                for offset, digest in enumerate(digests):
                    record = dataset.records[index + offset]
                    fingerprint.update(f"{record.relpath}\t{record.label}\t{digest}\n".encode())
                index += len(digests)
                pending_features.append(features)
                pending_labels.append(labels.to(torch.int64))
                pending_rows += features.shape[0]
                flush(final=False)
                bar.update(len(digests))
        flush(final=True)
        manifest = {
            "model": model.identity.to_dict(),
            "preprocess": model.preprocess_config,
            "dataset": {**dataset.describe(), "fingerprint": fingerprint.hexdigest()},
            "class_names": dataset.class_names,
            "num_samples": len(dataset),
            "feature_dim": int(feature_dim),
            "shards": shards,
        }
        write_manifest(staging / MANIFEST, FORMAT, FORMAT_VERSION, manifest)
    return out_dir


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
