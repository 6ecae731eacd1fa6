"""What a recipe's ``finetuned:`` says about a teacher that is not an open_clip model, and the
checks that need no file read: the ONNX and precomputed-logits teacher specs, their
preprocessing, where their side files are.

Both the recipe (``pipeline/recipe.py``, which builds and checks these specs when a recipe is
loaded) and the teachers themselves (``pipeline/teachers.py``, which run them) import this
module; it imports neither of them, so the two do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..features.preprocess import INTERPOLATIONS, RESIZE_MODES  # what open_clip's eval transform does

LOGITS_FILE_SUFFIXES = (".safetensors", ".npy")  # what a precomputed-logits file may be


@dataclass(frozen=True)
class TeacherPreprocess:
    """How an ONNX teacher's pixels are made: open_clip's eval transform with these settings."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"  # shortest side + centre crop | longest side + pad | squash
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class OnnxTeacher:
    """A fine-tuned classifier exported to ONNX from any framework: pixels (N, 3, H, W) -> (N, K)
    task logits."""

    onnx: Path
    preprocess: TeacherPreprocess | None = None  # default: the "preprocess" of <graph>.onnx.json beside it


@dataclass(frozen=True)
class LogitsTeacher:
    """Precomputed task logits (N, K) with the images they belong to (docs/recipes.md)."""

    logits: Path  # .safetensors (tensor "logits") or .npy
    images: Path | None = None  # the image list (JSON); default: beside the logits, <logits file>.json


def sidecar(path: Path) -> Path:
    """The JSON file beside a teacher file: its whole name + .json (teacher.onnx.json), so an ONNX
    graph and a logits file of the same stem never share one."""
    return Path(path).with_name(Path(path).name + ".json")


def images_path(ref: LogitsTeacher) -> Path:
    """The image list of a precomputed-logits teacher: given, or beside the logits file."""
    return ref.images if ref.images is not None else sidecar(ref.logits)


def check_preprocess(preprocess: TeacherPreprocess) -> None:
    if preprocess.image_size < 1:
        raise InputError(f"image_size must be positive, got {preprocess.image_size}")
    for name in ("mean", "std"):
        values = getattr(preprocess, name)
        if len(values) != 3 or not all(np.isfinite(values)):
            raise InputError(f"{name} must be 3 finite numbers (R, G, B), got {list(values)}")
    if not all(value > 0 for value in preprocess.std):
        raise InputError(f"std must be positive, got {list(preprocess.std)}")
    if preprocess.resize_mode not in RESIZE_MODES:
        raise InputError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got '{preprocess.resize_mode}'")
    if preprocess.interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got '{preprocess.interpolation}'")
