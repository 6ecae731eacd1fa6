"""Phase 1, extraction: learn what fine-tuning changed, as an adapter on the source's logits.

Inputs are the source model's zero-shot logits over all C classes and the
fine-tuned source's logits over the K task classes, for the same unlabelled
images. The adapter is trained so that its K task outputs match the
fine-tuned teacher (docs/method.md, "The method"):

    loss = tau * KL(softmax(l_ft / tau) || softmax(y[:, :K])),   tau = 0.5

with Gaussian noise (std 0.5 * per-sample std, probability 0.5) added to the
inputs, and the basis kept orthogonal by PyTorch's parametrisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter import AdapterConfig, TransMiterAdapter, check_logits, constrain_orthogonal, release_orthogonal
from ..errors import InputError
from .training import OptimSettings, train_adapter


@dataclass(frozen=True)
class ExtractionSettings(OptimSettings):
    """Reference defaults: 10 epochs, batch 128, AdamW lr 1e-3, wd 1e-3, 5% warm-up."""

    teacher_temperature: float = 0.5
    noise_probability: float = 0.5
    noise_scale: float = 0.5


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau * KL(softmax(teacher / tau) || softmax(student))``, mean over the batch."""
    target = F.log_softmax(teacher / temperature, dim=-1)
    return temperature * F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean", log_target=True)


def add_logit_noise(
    logits: torch.Tensor, probability: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """With ``probability`` per sample, add N(0, (scale * std(l))^2) noise to that sample.
    ``generator`` is a CPU generator: the draws are the same whatever device ``logits`` are on."""
    if probability <= 0 or scale <= 0:
        return logits
    chosen = (torch.rand(logits.shape[0], 1, generator=generator) < probability).to(logits.device)
    noise = torch.randn(logits.shape, generator=generator).to(logits.device) * (scale * logits.std(dim=1, keepdim=True))
    return torch.where(chosen, logits + noise, logits)


def extract(
    source_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    config: AdapterConfig,
    settings: ExtractionSettings = ExtractionSettings(),
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[TransMiterAdapter, list[float]]:
    """Train a fresh adapter on the source (on ``device``); returns it (basis materialised, on the
    CPU) and the loss per epoch."""
    settings.validate("extraction")
    check_logits(source_logits, config.logit_width, "source logits")
    if teacher_logits.ndim != 2 or teacher_logits.shape != (source_logits.shape[0], config.num_task_classes):
        raise InputError(
            f"teacher logits must have shape ({source_logits.shape[0]}, {config.num_task_classes}), "
            f"got {tuple(teacher_logits.shape)}"
        )
    if not torch.isfinite(teacher_logits).all():
        raise InputError("teacher logits contain NaN/inf")
    if not settings.teacher_temperature > 0:
        raise InputError("teacher temperature must be positive")

    adapter = TransMiterAdapter(config, seed=settings.seed)
    after_step = constrain_orthogonal(adapter, settings.orthogonal_map)
    source = source_logits.float().to(device)
    teacher = teacher_logits.float().to(device)

    def batch_loss(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        inputs = add_logit_noise(source[indices], settings.noise_probability, settings.noise_scale, generator)
        return distillation_loss(adapter.task_logits(inputs), teacher[indices], settings.teacher_temperature)

    history = train_adapter(adapter, len(source), batch_loss, settings, "extract", progress, after_step, device)
    release_orthogonal(adapter)
    return adapter, history


@torch.no_grad()
def mean_distillation_loss(
    adapter: TransMiterAdapter, source_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 0.5
) -> float:
    """The extraction objective on given samples, without noise (for held-out checks)."""
    return float(distillation_loss(adapter.task_logits(source_logits.float()), teacher_logits.float(), temperature))
