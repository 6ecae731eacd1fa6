"""Calibration images for the precisions that need them (int8): a seeded sample of the
recipe's own unlabelled images, preprocessed exactly as at inference.

The sample's fingerprint (the sha256 of each chosen file's bytes and relative path, in order,
plus the preprocessing) goes into the export manifest and the step's content key, so a
different calibration set redoes the conversion and is visible in the artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..features.datasets import decode_image, open_dataset
from ..features.models import LoadedModel

DEFAULT_IMAGES = 128
DEFAULT_MINIMUM = 32
HELD_OUT_MAX = 128  # gate images held out of the training images: a quarter of them, at most this many


@dataclass
class Calibration:
    pixels: torch.Tensor  # (N, 3, H, W), preprocessed
    record: dict  # images, seed, source, fingerprint: what the manifest records


def _seeded_order(count: int, seed: int) -> np.ndarray:
    """The one order both the calibration sample and the held-out images are cut from."""
    return np.random.default_rng(seed).permutation(count)


def preprocess_records(model: LoadedModel, records: list) -> torch.Tensor:
    """The dataset records' images, decoded and preprocessed as at inference, as one batch."""
    return torch.stack([model.preprocess(decode_image(record.path)[0]) for record in records])


def sample_calibration(model: LoadedModel, images: Path, count: int = DEFAULT_IMAGES,
                       minimum: int = DEFAULT_MINIMUM, seed: int = 0, exclude: int = 0) -> Calibration:
    """``count`` images drawn (seeded, without replacement) from ``images``; fewer than
    ``minimum`` available is refused. ``exclude``: the last ``exclude`` images of the seeded
    order are held out (the gate's images where a recipe has no test split) and never drawn."""
    dataset = open_dataset(Path(images))
    available = len(dataset) - exclude
    if count < minimum:
        raise InputError(f"calibration: {count} images asked for, the minimum is {minimum}")
    if available < minimum:
        raise InputError(f"calibration: {images} has {available} usable images, fewer than the minimum {minimum}")
    order = _seeded_order(len(dataset), seed)
    chosen = [dataset.records[i] for i in sorted(order[: min(count, available)])]
    digest = hashlib.sha256(json.dumps(model.preprocess_config, sort_keys=True).encode())
    pictures = []
    for record in chosen:
        picture, sha256 = decode_image(record.path)
        digest.update(f"{record.relpath}\0{sha256}\0".encode())
        pictures.append(model.preprocess(picture))
    pixels = torch.stack(pictures)
    bad = (~torch.isfinite(pixels.flatten(1))).any(dim=1)
    if bad.any():
        raise InputError(f"calibration image {chosen[int(bad.nonzero()[0])].path} is not finite after preprocessing")
    return Calibration(pixels, {"images": len(chosen), "seed": seed, "source": str(images),
                                "fingerprint": digest.hexdigest()})


def held_out(model: LoadedModel, images: Path, seed: int = 0) -> torch.Tensor:
    """Gate images for recipes without a test split: the last quarter (at most
    :data:`HELD_OUT_MAX`) of the seeded order, which :func:`sample_calibration` never draws from
    when given ``exclude`` = their number."""
    dataset = open_dataset(Path(images))
    count = min(HELD_OUT_MAX, len(dataset) // 4)
    order = _seeded_order(len(dataset), seed)
    return preprocess_records(model, [dataset.records[i] for i in sorted(order[len(dataset) - count:])])
