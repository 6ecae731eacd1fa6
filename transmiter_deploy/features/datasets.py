"""Image datasets on disk: an ImageFolder tree or a CSV of ``path,label``.

Read once, by :mod:`.cache`; nothing else touches images. Layouts:

- a directory whose sub-directories are classes (sorted names = class order);
- a directory of images with no sub-directories (unlabelled);
- a CSV with a header naming a ``path`` column and optionally ``label``;
  paths are relative to the CSV's directory and must stay inside it.

Every problem (empty directory, stray non-image file, unknown label, a file
that does not decode) is an :class:`~.errors.InputError` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
UNLABELLED = -1


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    relpath: str
    label: int


@dataclass
class ImageDataset:
    root: Path
    kind: str  # "folder" | "csv"
    records: list[ImageRecord]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": str(self.root), "num_samples": len(self.records)}


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _check_image_file(path: Path, root: Path) -> None:
    if not _is_image(path):
        raise InputError(f"not an image file (extension '{path.suffix}'): {path.relative_to(root)} in {root}")


def _folder_dataset(root: Path, class_names: list[str] | None) -> ImageDataset:
    entries = sorted(p for p in root.iterdir() if _visible(p))
    if not entries:
        raise InputError(f"dataset directory {root} is empty")
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if not p.is_dir()]
    records: list[ImageRecord] = []
    if not class_dirs:  # a flat directory of images: unlabelled
        for path in loose:
            _check_image_file(path, root)
            records.append(ImageRecord(path, path.name, UNLABELLED))
        return ImageDataset(root, "folder", records, list(class_names or []))
    if loose:
        raise InputError(
            f"dataset directory {root} mixes class sub-directories with loose files (first: {loose[0].name})"
        )
    found = [d.name for d in class_dirs]
    names = list(class_names) if class_names is not None else found
    unknown = [name for name in found if name not in names]
    if unknown:
        raise InputError(f"dataset directory {root} has class directory '{unknown[0]}' not in the class list")
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and _visible(p))
        if not files:
            raise InputError(f"class directory {class_dir} has no images")
        for path in files:
            _check_image_file(path, root)
            records.append(ImageRecord(path, path.relative_to(root).as_posix(), names.index(class_dir.name)))
    return ImageDataset(root, "folder", records, names)


def _csv_dataset(csv_path: Path, class_names: list[str] | None) -> ImageDataset:
    root = csv_path.parent.resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read CSV {csv_path}: {exc}") from exc
    if not rows:
        raise InputError(f"CSV {csv_path} has no rows")
    if "path" not in header:
        raise InputError(f"CSV {csv_path} needs a 'path' column (header is: {', '.join(header)})")
    labelled = "label" in header
    labels = [(row.get("label") or "").strip() for row in rows] if labelled else []
    if class_names is None:
        class_names = sorted({label for label in labels if label})
    records = []
    for line, row in enumerate(rows, start=2):
        raw = (row.get("path") or "").strip()
        if not raw:
            raise InputError(f"CSV {csv_path} line {line}: empty path")
        path = (root / raw).resolve()
        if not path.is_relative_to(root):
            raise InputError(f"CSV {csv_path} line {line}: path '{raw}' is outside the dataset root {root}")
        if not path.is_file():
            raise InputError(f"CSV {csv_path} line {line}: file not found: {raw}")
        _check_image_file(path, root)
        label = UNLABELLED
        if labelled and labels[line - 2]:
            if labels[line - 2] not in class_names:
                raise InputError(f"CSV {csv_path} line {line}: unknown label '{labels[line - 2]}'")
            label = class_names.index(labels[line - 2])
        records.append(ImageRecord(path, path.relative_to(root).as_posix(), label))
    return ImageDataset(csv_path, "csv", records, list(class_names))


def open_dataset(location: Path, class_names: list[str] | None = None) -> ImageDataset:
    """Index a dataset without decoding anything yet; ``class_names`` fixes the class order."""
    location = Path(location)
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise InputError("class list has duplicate names")
    if location.is_dir():
        return _folder_dataset(location, class_names)
    if location.is_file() and location.suffix.lower() == ".csv":
        return _csv_dataset(location, class_names)
    if not location.exists():
        raise InputError(f"dataset not found: {location}")
    raise InputError(f"dataset must be a directory or a .csv file: {location}")


def decode_image(path: Path) -> tuple[Image.Image, str]:
    """The image as RGB and the sha256 of its bytes (for the dataset fingerprint)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror}") from exc
    if not data:
        raise InputError(f"image file is empty: {path}")
    return decode_image_bytes(data, f"image {path}"), hashlib.sha256(data).hexdigest()


def decode_image_bytes(data: bytes, what: str = "image") -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) as RGB; one InputError line naming ``what`` when they
    are empty or not an image."""
    if not data:
        raise InputError(f"{what} is empty (no bytes)")
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()
            return as_rgb(image)
    except UnidentifiedImageError as exc:  # PIL's message names its BytesIO object, not the image
        raise InputError(f"cannot decode {what}: not an image format PIL can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot decode {what}: {exc}") from exc


def as_rgb(image: Image.Image) -> Image.Image:
    """An image in RGB as every model reads it."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: PIL's RGB conversion clips at 255 (an almost white image);
        # keep the top 8 bits instead
        wide = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


class PreprocessedImages(torch.utils.data.Dataset):
    """Yields ``(pixels, label, sha256)`` per record, for a DataLoader."""

    def __init__(self, dataset: ImageDataset, preprocess: Callable) -> None:
        self.records = dataset.records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        record = self.records[index]
        image, digest = decode_image(record.path)
        return self.preprocess(image), record.label, digest
