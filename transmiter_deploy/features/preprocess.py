"""Pixels from an image as every model of the toolkit sees them: open_clip's eval transform,
built from a preprocess record (a model's ``preprocess_config``, an export manifest's
``preprocess``). One implementation for the Python side (the serving API, ONNX teachers); the C++
runtime reimplements it and is tested against it bit for bit (tests/cpp/test_cpp_runtime.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..errors import InputError

if TYPE_CHECKING:  # the recipe imports this module's names, and loads without torch or PIL
    import torch
    from PIL import Image

RESIZE_MODES = ("shortest", "longest", "squash")  # what open_clip's eval transform does
INTERPOLATIONS = ("bicubic", "bilinear")


def eval_transform(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], resize_mode: str = "shortest",
                   interpolation: str = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform: RGB image -> float32 (3, image_size, image_size)."""
    from open_clip.transform import image_transform

    if resize_mode not in RESIZE_MODES:
        raise InputError(f"resize_mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return image_transform(image_size, is_train=False, mean=tuple(mean), std=tuple(std),
                           resize_mode=resize_mode, interpolation=interpolation)


def record_transform(record: dict[str, Any], where: str) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`eval_transform` for a preprocess record (``image_size`` square, as ``[h, w]`` or an
    integer); one InputError line naming ``where`` when the record cannot be one."""
    try:
        size = record["image_size"]
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(f"image_size must be a positive integer or a square [height, width], got "
                             f"{record['image_size']!r}")
        mean, std = tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InputError("mean and std must have 3 values each, std positive")
        return eval_transform(size, mean, std, record.get("resize_mode", "shortest"),
                              record.get("interpolation", "bicubic"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: preprocess record is incomplete or malformed ({exc})") from exc
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc
