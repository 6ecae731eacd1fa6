"""Calibration images for the precisions that need them (int8): a seeded sample of the
recipe's own unlabelled images (a bank's: of all its calibrating tasks' images), preprocessed
exactly as at inference.

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


@dataclass
class CalibrationSource:
    """One image set a calibration sample is drawn from: a bank task's training images, named in
    every error, or a recipe's own images (``name`` None)."""

    images: Path
    name: str | None = None
    exclude: int = 0  # the last ``exclude`` images of its seeded order are held out (gate images)

    def where(self) -> str:
        return f"task {self.name}'s images {self.images}" if self.name else str(self.images)


def sample_calibration(model: LoadedModel, images: Path, count: int = DEFAULT_IMAGES,
                       minimum: int = DEFAULT_MINIMUM, seed: int = 0, exclude: int = 0) -> Calibration:
    """``count`` images drawn (seeded, without replacement) from ``images``; fewer than
    ``minimum`` available is refused. ``exclude``: the last ``exclude`` images of the seeded
    order are held out (the gate's images where a recipe has no test split) and never drawn."""
    return sample_across(model, [CalibrationSource(Path(images), exclude=exclude)], count, minimum, seed)


def sample_across(model: LoadedModel, sources: list[CalibrationSource], count: int = DEFAULT_IMAGES,
                  minimum: int = DEFAULT_MINIMUM, seed: int = 0) -> Calibration:
    """``count`` images drawn (seeded, without replacement) from the union of ``sources`` (a
    bank's tasks); fewer than ``minimum`` usable images in all is refused, naming each source's
    count. One source: the first ``count`` of its seeded order. Several: each source's usable
    images in its own seeded order, then one seeded draw over all of them, so every task is
    represented about in proportion to its images."""
    if count < minimum:
        raise InputError(f"calibration: {count} images asked for, the minimum is {minimum}")
    eligible = []  # (source index, record), each source's usable records in its seeded order
    datasets = []
    for index, source in enumerate(sources):
        dataset = open_dataset(Path(source.images))
        order = _seeded_order(len(dataset), seed)
        usable = order[: max(0, len(dataset) - source.exclude)]
        datasets.append((source, len(usable)))
        eligible += [(index, int(i), dataset.records[i]) for i in usable]
    if len(eligible) < minimum:
        if len(sources) == 1:
            raise InputError(f"calibration: {sources[0].where()} has {len(eligible)} usable images, fewer than "
                             f"the minimum {minimum}")
        counts = ", ".join(f"{source.name}: {n}" for source, n in datasets)
        raise InputError(f"calibration: the tasks' images hold {len(eligible)} usable images ({counts}), fewer "
                         f"than the minimum {minimum}")
    if len(sources) > 1:
        eligible = [eligible[i] for i in _seeded_order(len(eligible), seed)]
    chosen = sorted(eligible[: min(count, len(eligible))], key=lambda item: item[:2])
    digest = hashlib.sha256(json.dumps(model.preprocess_config, sort_keys=True).encode())
    pictures = []
    for index, _, record in chosen:
        source = sources[index]
        try:
            picture, sha256 = decode_image(record.path)
        except InputError as exc:
            raise InputError(f"calibration: {exc}" + (f" (task {source.name})" if source.name else "")) from exc
        # a task's name prefixes its paths: two tasks may hold the same relative path
        digest.update(f"{source.name + '/' if source.name else ''}{record.relpath}\0{sha256}\0".encode())
        pictures.append(model.preprocess(picture))
    pixels = torch.stack(pictures)
    bad = (~torch.isfinite(pixels.flatten(1))).any(dim=1)
    if bad.any():
        index, _, record = chosen[int(bad.nonzero()[0])]
        named = f" (task {sources[index].name})" if sources[index].name else ""
        raise InputError(f"calibration image {record.path}{named} is not finite after preprocessing")
    source_record: str | list[str] = (str(sources[0].images) if len(sources) == 1
                                      else [f"{s.name}: {s.images}" for s in sources])
    return Calibration(pixels, {"images": len(chosen), "seed": seed, "source": source_record,
                                "fingerprint": digest.hexdigest()})


def held_out(model: LoadedModel, images: Path, seed: int = 0) -> torch.Tensor:
    """Gate images for recipes without a test split: the last quarter (at most
    :data:`HELD_OUT_MAX`) of the seeded order, which :func:`sample_calibration` never draws from
    when given ``exclude`` = their number."""
    dataset = open_dataset(Path(images))
    count = held_out_count(images)
    order = _seeded_order(len(dataset), seed)
    return preprocess_records(model, [dataset.records[i] for i in sorted(order[len(dataset) - count:])])


def held_out_count(images: Path) -> int:
    """How many of ``images`` :func:`held_out` holds out for the gate."""
    return min(HELD_OUT_MAX, len(open_dataset(Path(images))) // 4)
