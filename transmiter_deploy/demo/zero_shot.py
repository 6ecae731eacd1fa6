"""Zero-shot classification on the demo world's rendered images, straight from pixels.

Training needs it without the cache machinery (fine-tuning heads, and the
reference accuracies recorded in the weights manifest and checked by tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..features.models import LoadedModel, load_model
from .tasks import DemoTask
from .weights import LARGE, SOURCE, TARGET, demo_model_spec
from .world import render

REFERENCE_SPLIT, REFERENCE_PER_CLASS = "val", 8


def render_many(scenes, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3)."""
    return torch.from_numpy(np.stack([np.asarray(render(scene, size)) for scene in scenes]))


def to_pixels(images: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    """The model's own eval preprocessing for images already at its input size."""
    mean = torch.tensor(model.preprocess_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_config["std"]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


@torch.no_grad()
def class_head(model: LoadedModel, task: DemoTask, classes: tuple[str, ...]) -> torch.Tensor:
    rows = []
    for name in classes:
        embedding = model.encode_texts([template.format(name) for template in task.templates]).mean(0)
        rows.append(F.normalize(embedding, dim=-1))
    return torch.stack(rows) * model.logit_scale


@torch.no_grad()
def reference_accuracy(weights_dir: Path, tasks: list[DemoTask]) -> dict[str, dict[str, float]]:
    """Top-1 zero-shot accuracy (%, all classes) of the saved source and target (and the larger
    upgrade target, where it was trained) on a fixed small batch of each task: recorded at training
    time, reproduced by the tests."""
    roles = (("source", SOURCE), ("target", TARGET), ("large", LARGE))
    models = {tag: load_model(demo_model_spec(weights_dir, name)) for tag, name in roles
              if (Path(weights_dir) / f"{name}.safetensors").is_file()}
    result = {}
    for task in tasks:
        scenes = task.scenes(REFERENCE_SPLIT, REFERENCE_PER_CLASS)
        labels = torch.tensor([label for _, label in scenes])
        result[task.name] = {}
        for tag, model in models.items():
            images = render_many([scene for scene, _ in scenes], model.preprocess_config["image_size"][0])
            features = model.encode_images(to_pixels(images, model))
            predicted = (features @ class_head(model, task, task.classes).T).argmax(dim=1)
            result[task.name][tag] = round(100.0 * float((predicted == labels).float().mean()), 4)
    return result
