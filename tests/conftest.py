"""Shared fixtures: small data the tests make themselves (no downloads anywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def draw_image(colour: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    """A coloured square on a noisy background: deterministic per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    x, y = rng.integers(2, size // 2, size=2)
    pixels[y : y + size // 2, x : x + size // 2] = colour
    return Image.fromarray(pixels)


def make_image_folder(root: Path, per_class: int = 3, classes: dict = COLOURS) -> Path:
    for index, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_image(colour, seed=100 * index + i).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def clip_like_logits(samples: int, width: int, feature_dim: int = 32, seed: int = 0, scale: float = 20.0):
    """Logits shaped like CLIP's: scale * cosine(features, head rows). Returns (logits, features, head)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(samples, feature_dim, generator=generator), dim=1)
    head = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator), dim=1) * scale
    return features @ head.T, features, head
