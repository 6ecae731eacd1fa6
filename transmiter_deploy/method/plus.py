"""Phase 3, TransMiter+: refine a transferred adapter with a few labelled shots.

Cross-entropy on the adapter's K task outputs over the target model's
logits; only the adapter learns (the backbone is never touched, its logits
come from the cache). The orthogonality of the basis can be kept (default)
or dropped for more freedom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter import TransMiterAdapter, clone_adapter, check_logits, constrain_orthogonal, release_orthogonal
from ..errors import InputError
from .training import OptimSettings, train_adapter


@dataclass(frozen=True)
class PlusSettings(OptimSettings):
    """lr 1e-4 and wd 1e-3 from the reference; epochs, batch and warm-up are this project's defaults."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    warmup_fraction: float = 0.1
    keep_orthogonal: bool = True


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Up to ``shots`` seeded samples of each labelled class (all of them if fewer exist)."""
    if shots < 1:
        raise InputError(f"shots must be positive, got {shots}")
    generator = torch.Generator().manual_seed(seed)
    classes = range(num_classes) if num_classes is not None else sorted(set(labels[labels >= 0].tolist()))
    chosen = []
    for cls in classes:
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    picked = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.int64)
    return picked.sort().values


def train_plus(
    adapter: TransMiterAdapter,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    settings: PlusSettings = PlusSettings(),
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[TransMiterAdapter, list[float]]:
    """Return a refined copy of ``adapter`` (trained on ``device``, returned on the CPU) and the
    loss per epoch; unlabelled rows are ignored."""
    settings.validate("TransMiter+")
    config = adapter.config
    check_logits(target_logits, config.logit_width, "target logits")
    if labels.shape != (target_logits.shape[0],):
        raise InputError(f"labels must have shape ({target_logits.shape[0]},), got {tuple(labels.shape)}")
    keep = labels >= 0
    if not keep.any():
        raise InputError("TransMiter+ needs labelled samples; the cache has none")
    if (labels[keep] >= config.num_task_classes).any():
        raise InputError(f"labels must be below the {config.num_task_classes} task classes")
    logits, targets = target_logits[keep].float().to(device), labels[keep].to(device)

    refined = clone_adapter(adapter)
    after_step = None
    if settings.keep_orthogonal:
        after_step = constrain_orthogonal(refined, settings.orthogonal_map)

    def batch_loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(refined.task_logits(logits[indices]), targets[indices])

    history = train_adapter(refined, len(logits), batch_loss, settings, "plus", progress, after_step, device)
    release_orthogonal(refined)
    return refined, history
