"""The TransMiter adapter: a small network that works purely in logit space.

Forward pass (docs/method.md, "The method"), for logits ``l`` of width C:

1. standardise per sample: ``s = (l - mu) / (sigma + eps)`` (unbiased std);
2. push into a latent of width D with an orthogonal basis ``W`` (D x C): ``x = s W^T``;
3. residual MLP blocks: ``x <- x + alpha * MLP(LayerNorm(x))``;
4. pull back with the same (tied) basis: ``z = x W``;
5. de-standardise: ``y = z * sigma + mu``.

The last Linear of every block starts at zero, so with D = C the adapter is
exactly the identity at initialisation: extraction starts from zero-shot
behaviour and only learns the change fine-tuning made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ..errors import InputError

# PyTorch parametrisations, plus "qr": a plain parameter re-orthogonalised by a
# QR retraction after every optimiser step (see constrain_orthogonal).
ORTHOGONAL_MAPS = ("cayley", "matrix_exp", "householder", "qr")


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter; the reference configuration is C = D = 1024, ratio 4, 1 layer."""

    num_task_classes: int
    logit_width: int = 1024
    latent_dim: int = 1024
    mlp_ratio: int = 4
    num_layers: int = 1
    alpha: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("num_task_classes", "logit_width", "latent_dim", "mlp_ratio", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"adapter config: {name} must be a positive integer, got {value!r}")
        if self.num_task_classes > self.logit_width:
            raise InputError(
                f"adapter config: {self.num_task_classes} task classes do not fit in a logit "
                f"width of {self.logit_width}"
            )
        if self.latent_dim > self.logit_width:
            raise InputError(
                f"adapter config: latent_dim {self.latent_dim} exceeds logit_width "
                f"{self.logit_width}; an orthogonal push needs D <= C"
            )
        for name in ("alpha", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InputError(f"adapter config: {name} must be a finite number, got {value!r}")
        if not self.eps > 0:
            raise InputError(f"adapter config: eps must be positive, got {self.eps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def standardise(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample standardisation; returns ``(s, mu, sigma)`` with keepdim statistics."""
    mu = logits.mean(dim=-1, keepdim=True)
    sigma = logits.std(dim=-1, keepdim=True, unbiased=True)
    return (logits - mu) / (sigma + eps), mu, sigma


class ResidualMLP(nn.Module):
    """``x + alpha * Linear(GELU(Linear(LayerNorm(x))))`` with the last Linear zeroed."""

    def __init__(self, width: int, ratio: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ratio * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(self.act(self.fc1(self.norm(x))))


class TransMiterAdapter(nn.Module):
    """Logits (N, C) in, adapted logits (N, C) out; ``task_logits`` keeps the K task columns."""

    def __init__(self, config: AdapterConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        # A private RNG stream: the same seed gives bit-identical adapters and
        # building one never disturbs the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Orthogonalised in float64 and then rounded: W^T W is then as close
            # to I as float32 allows, which keeps the identity at init tight.
            basis = torch.empty(config.latent_dim, config.logit_width, dtype=torch.float64)
            nn.init.orthogonal_(basis)
            self.basis = nn.Parameter(basis.float())  # W_in (D x C), tied: W_out = W_in
            self.blocks = nn.ModuleList(
                ResidualMLP(config.latent_dim, config.mlp_ratio, config.alpha)
                for _ in range(config.num_layers)
            )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        standardised, mu, sigma = standardise(logits, self.config.eps)
        basis = self.basis  # read once: under a parametrisation each read recomputes it
        latent = standardised @ basis.T
        for block in self.blocks:
            latent = block(latent)
        return (latent @ basis) * sigma + mu

    def task_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.forward(logits)[:, : self.config.num_task_classes]

    @torch.no_grad()
    def reorthogonalise_(self) -> None:
        """Replace the basis W by Q^T from the QR decomposition W^T = QR (positive diag R).

        Computed as Cholesky-QR (W W^T = L L^T, Q^T = L^-1 W), which gives the
        same Q at a third of the cost of Householder QR for a basis that is
        already nearly orthogonal; an orthogonal basis is left unchanged up to
        rounding. Falls back to Householder QR if the Gram matrix is not
        numerically positive definite.
        """
        basis = self.basis.detach()
        factor, info = torch.linalg.cholesky_ex(basis @ basis.T)
        if int(info) == 0:
            orthonormal = torch.linalg.solve_triangular(factor, basis, upper=False)
        else:
            q, r = torch.linalg.qr(basis.T)
            orthonormal = (q * torch.sign(torch.diagonal(r))).T
        self.basis.copy_(orthonormal)

    def orthogonality_error(self) -> float:
        """``max |W W^T - I|``: how far the basis is from orthonormal rows."""
        with torch.no_grad():
            basis = self.basis.double()
            eye = torch.eye(basis.shape[0], dtype=basis.dtype)
            return float((basis @ basis.T - eye).abs().max())


def constrain_orthogonal(adapter: TransMiterAdapter, orthogonal_map: str = "qr") -> Callable[[], None] | None:
    """Keep the basis orthogonal while training; returns a hook to call after each optimiser step.

    ``cayley``, ``matrix_exp`` and ``householder`` use PyTorch's own
    parametrisation, with the current basis as the starting point
    (trivialisation), so a transferred basis stays where the transfer put it;
    they need no hook. ``qr`` leaves the basis a plain parameter and returns a
    hook that re-orthogonalises it after every step (a QR retraction): the
    basis is orthogonal at every forward pass, at a fraction of the cost of
    differentiating through the Cayley map (see benchmarks/bench_core.py).
    """
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise InputError(f"orthogonal map must be one of {', '.join(ORTHOGONAL_MAPS)}, got {orthogonal_map!r}")
    if orthogonal_map == "qr":
        adapter.reorthogonalise_()
        return adapter.reorthogonalise_
    orthogonal(adapter, "basis", orthogonal_map=orthogonal_map, use_trivialization=True)
    return None


def release_orthogonal(adapter: TransMiterAdapter) -> None:
    """Materialise the constrained basis as a plain parameter (for saving and inference)."""
    if parametrize.is_parametrized(adapter, "basis"):
        parametrize.remove_parametrizations(adapter, "basis", leave_parametrized=True)


def check_logits(logits: torch.Tensor, width: int, what: str) -> None:
    """Refuse logits the adapter cannot standardise: wrong width, NaN/inf, sigma = 0."""
    if logits.ndim != 2 or logits.shape[1] != width:
        raise InputError(f"{what}: expected logits of width {width}, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise InputError(f"{what}: no samples")
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.all():
        raise InputError(f"{what}: {int((~finite).sum())} samples have NaN/inf logits (first: row {int((~finite).nonzero()[0])})")
    flat = logits.std(dim=1) == 0
    if flat.any():
        raise InputError(
            f"{what}: {int(flat.sum())} samples have constant logits (sigma = 0; first: row "
            f"{int(flat.nonzero()[0])}); standardisation is undefined for them"
        )


def clone_adapter(adapter: TransMiterAdapter) -> TransMiterAdapter:
    """A deep copy with plain (unconstrained) parameters."""
    copy = TransMiterAdapter(adapter.config)
    copy.load_state_dict({k: v.clone() for k, v in adapter.state_dict().items()})
    return copy
