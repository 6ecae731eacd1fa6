"""``transmiter predict``'s library side: image files and folders through a :class:`Deployment`,
one result per image, an unreadable image named and skipped rather than stopping the rest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from .deployment import Deployment, Prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what a folder is searched for


@dataclass
class ImageResult:
    """One image: its predictions per task, or why it could not be read."""

    path: Path
    predictions: dict[str, Prediction] | None = None
    error: str | None = None

    def json_lines(self) -> list[str]:
        """One JSON object per task (or one with the error), as ``--json`` writes them."""
        if self.predictions is None:
            return [json.dumps({"image": str(self.path), "error": self.error})]
        return [json.dumps({"image": str(self.path), "task": task,
                            "top": [{"class": name, "score": score} for name, score in prediction.top]})
                for task, prediction in self.predictions.items()]


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Each input file as given, each folder's image files (by suffix, recursively, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(path for path in item.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{item} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise InputError(f"image or folder not found: {item}")
    return paths


def predict_paths(deployment: Deployment, paths: Sequence[Path], topk: int = 5, tasks: Sequence[str] | None = None,
                  batch: int | None = None, advance: Callable[[int], None] = lambda _: None) -> Iterator[ImageResult]:
    """Every image of ``paths`` through ``deployment`` in batches of ``batch`` (default: the
    deployment's), in order; ``advance(n)`` after each batch (a progress bar)."""
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    size = batch or deployment.max_batch
    for start in range(0, len(paths), size):
        chunk = [ImageResult(path) for path in paths[start:start + size]]
        pixels = []
        for result in chunk:
            try:
                pixels.append(deployment.preprocess([result.path])[0])
            except InputError as exc:
                result.error = str(exc)
        readable = [result for result in chunk if result.error is None]
        if readable:
            for result, predictions in zip(readable, deployment.classify_pixels(np.stack(pixels), topk, tasks)):
                result.predictions = predictions
        advance(len(chunk))
        yield from chunk
