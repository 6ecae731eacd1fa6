"""Phase 2, transfer: move an adapter onto another model in closed form, without backprop.

For the same unlabelled images, standardise the source and target logits
(same class list, same order) and push both through the adapter's basis W:
``Z_s = s_s W^T``, ``Z_t = s_t W^T`` (N x D). The rotation that best maps
target latents onto source latents solves the regularised orthogonal
Procrustes problem

    R = Z_t^T Z_s + lambda I = U S V^T,   Q = U V^T,

and the target adapter keeps the MLP with the basis ``W' = Q^T W`` (still
orthogonal): it pushes target logits to where the source's would be, applies
what the source learned there, and pulls back into the target's logit space.

``lambda`` (reference 500) acts on the raw sum over N samples, so its effect
shrinks as N grows; ``lambda_mode="mean"`` divides the sum by N instead, so
the same lambda means the same regularisation at any N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import TransMiterAdapter, clone_adapter, check_logits, standardise
from ..errors import InputError

LAMBDA_MODES = ("sum", "mean")


@dataclass(frozen=True)
class TransferResult:
    adapter: TransMiterAdapter
    rotation: torch.Tensor  # Q (D x D), float64
    num_samples: int
    regularisation: float
    lambda_mode: str

    def provenance(self) -> dict:
        return {
            "lambda": self.regularisation,
            "lambda_mode": self.lambda_mode,
            "num_samples": self.num_samples,
            # How far the transfer moved the basis: ||Q - I||_F / sqrt(D).
            "rotation_distance": float(
                torch.linalg.matrix_norm(self.rotation - torch.eye(self.rotation.shape[0], dtype=torch.float64))
                / self.rotation.shape[0] ** 0.5
            ),
        }


def procrustes_rotation(z_target: torch.Tensor, z_source: torch.Tensor, regularisation: float) -> torch.Tensor:
    """``argmax_Q tr(Q^T (Z_t^T Z_s + lambda I))`` over orthogonal Q, in float64."""
    if z_target.shape != z_source.shape or z_target.ndim != 2:
        raise InputError(f"latents must have equal 2-D shapes, got {tuple(z_target.shape)} and {tuple(z_source.shape)}")
    cross = z_target.double().T @ z_source.double()
    cross += regularisation * torch.eye(cross.shape[0], dtype=torch.float64)
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def transfer(
    adapter: TransMiterAdapter,
    source_logits: torch.Tensor,
    target_logits: torch.Tensor,
    regularisation: float = 500.0,
    lambda_mode: str = "sum",
) -> TransferResult:
    """Return a new adapter for the target model; the input adapter is left unchanged."""
    config = adapter.config
    if lambda_mode not in LAMBDA_MODES:
        raise InputError(f"lambda mode must be one of {', '.join(LAMBDA_MODES)}, got {lambda_mode!r}")
    if not regularisation >= 0:
        raise InputError(f"lambda must be >= 0, got {regularisation}")
    check_logits(source_logits, config.logit_width, "source logits")
    check_logits(target_logits, config.logit_width, "target logits")
    if source_logits.shape[0] != target_logits.shape[0]:
        raise InputError(
            f"source and target logits must cover the same images: {source_logits.shape[0]} vs {target_logits.shape[0]} rows"
        )
    basis = adapter.basis.detach().double()
    z_source = standardise(source_logits.double(), config.eps)[0] @ basis.T
    z_target = standardise(target_logits.double(), config.eps)[0] @ basis.T
    num_samples = source_logits.shape[0]
    if lambda_mode == "mean":
        z_source = z_source / num_samples  # scales Z_t^T Z_s by 1/N; Q depends only on that product
    rotation = procrustes_rotation(z_target, z_source, regularisation)
    moved = clone_adapter(adapter)
    with torch.no_grad():
        moved.basis.copy_((rotation.T @ basis).float())
    moved.eval()
    return TransferResult(moved, rotation, num_samples, float(regularisation), lambda_mode)
