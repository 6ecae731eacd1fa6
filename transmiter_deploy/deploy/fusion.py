"""Deployment fusion: the adapter folded into the target model's zero-shot head.

The straightforward deployed head computes all C logits ``l = H f`` and then
runs the adapter. Mean-centring and the push are linear, so they fold into
the head (docs/method.md, "Deployment algebra"):

    h = H^T 1 / C            mu = h . f + b      (b: SigLIP's logit bias, else 0)
    H_c = H - 1 h^T          l - mu = H_c f
    M = H_c^T W^T (d x D)    x = (f M) / (sigma + eps)
    sigma^2 = f^T (H_c^T H_c) f / (C - 1)     or, when W is square orthogonal,
    sigma = ||f M|| / sqrt(C - 1)             (the pushed vector keeps the norm)
    y_K = (MLP(x) W[:, :K]) * sigma + mu

so the auxiliary classes cost nothing at inference and only the K task
columns of the pull are kept. Statistics (mean, sigma, the division by sigma)
and de-standardisation live in the ``stats`` and ``destandardise``
submodules, and the feature normalisation in ``normalise``, so
reduced-precision exports can find those nodes by name and keep them fp32.

:class:`UnfoldedHead` is the reference (full C logits, then the adapter); the
two must agree to float rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..features.adapter_artifact import AdapterArtifact, check_adapter_head
from ..errors import InputError
from ..features.heads import ZeroShotHead

SIGMA_MODES = ("auto", "norm", "gram")
# The nodes of the modules below that every reduced-precision graph keeps in fp32 (regexes over
# the exported node names, matched from the start): the feature normalisation, the statistics,
# the de-standardisation.
FP32_NODES = (r".*/normalise/.*", r".*/stats/.*", r".*/destandardise/.*")
ORTHOGONALITY_TOLERANCE = 1e-5  # max |W W^T - I| for the norm shortcut


class Statistics(nn.Module):
    """Mean and std of the (never materialised) C logits, and the standardised latent.

    Returns ``(x, mu, sigma)`` with ``x = (f M) / (sigma + eps)``.
    """

    def __init__(self, mean_vector: torch.Tensor, gram: torch.Tensor | None, dof: int, eps: float,
                 logit_bias: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean_vector", mean_vector)  # (d, 1)
        self.register_buffer("gram", gram)  # (d, d) or None for the norm shortcut
        self.dof = dof  # C - 1: the unbiased std over the C logits
        self.eps = eps
        # SigLIP's bias shifts every logit alike: it moves the mean and nothing else (sigma, the
        # standardised latent), so it is added to mu alone; CLIP's 0 adds no node to the graph
        self.logit_bias = float(logit_bias)

    def forward(self, features: torch.Tensor, pushed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Computed in the buffers' precision (fp32) whatever the GEMMs around use:
        # sums of squares of ~100-sized logits overflow fp16.
        features, pushed = features.to(self.mean_vector.dtype), pushed.to(self.mean_vector.dtype)
        mu = features @ self.mean_vector
        if self.logit_bias:
            mu = mu + self.logit_bias
        if self.gram is None:
            sum_squares = (pushed * pushed).sum(dim=-1, keepdim=True)
        else:
            sum_squares = ((features @ self.gram) * features).sum(dim=-1, keepdim=True)
        sigma = torch.sqrt(sum_squares / self.dof)
        return pushed / (sigma + self.eps), mu, sigma


class Destandardise(nn.Module):
    def forward(self, z: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return z.to(sigma.dtype) * sigma + mu


class FoldedHead(nn.Module):
    """Image features (N, d) -> task logits (N, K): the deployed head."""

    def __init__(self, head: ZeroShotHead, artifact: AdapterArtifact, sigma_mode: str = "auto") -> None:
        super().__init__()
        check_adapter_head(artifact, head, "head")
        if sigma_mode not in SIGMA_MODES:
            raise InputError(f"sigma mode must be one of {', '.join(SIGMA_MODES)}, got {sigma_mode!r}")
        config = artifact.adapter.config
        # The norm shortcut is exact only for a square orthogonal basis (W^T W = I);
        # TransMiter+ with --free-basis, or D < C, needs the Gram form.
        orthogonal = (
            config.latent_dim == config.logit_width
            and artifact.adapter.orthogonality_error() <= ORTHOGONALITY_TOLERANCE
        )
        if sigma_mode == "norm" and not orthogonal:
            raise InputError("sigma mode 'norm' needs a square orthogonal basis; use 'gram'")
        self.sigma_mode = ("norm" if orthogonal else "gram") if sigma_mode == "auto" else sigma_mode
        # Fold in float64, then round once to the head's precision (fp32 normally).
        dtype = head.weight.dtype
        weight = head.weight.double()
        basis = artifact.adapter.basis.detach().double()
        mean_vector = weight.mean(dim=0)
        centred = weight - mean_vector
        self.register_buffer("push", (centred.T @ basis.T).to(dtype))  # M (d x D)
        self.register_buffer("pull", basis[:, : config.num_task_classes].contiguous().to(dtype))  # (D x K)
        gram = (centred.T @ centred).to(dtype) if self.sigma_mode == "gram" else None
        self.stats = Statistics(mean_vector.to(dtype).unsqueeze(1), gram, config.logit_width - 1, config.eps,
                                head.logit_bias)
        self.blocks = copy.deepcopy(artifact.adapter.blocks).to(dtype)
        self.destandardise = Destandardise()
        self.num_task_classes = config.num_task_classes
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latent, mu, sigma = self.stats(features, features @ self.push)
        for block in self.blocks:
            latent = block(latent)
        return self.destandardise(latent @ self.pull, sigma, mu)


class UnfoldedHead(nn.Module):
    """The reference: all C logits, then the whole adapter, then the K task columns."""

    def __init__(self, head: ZeroShotHead, artifact: AdapterArtifact) -> None:
        super().__init__()
        check_adapter_head(artifact, head, "head")
        self.register_buffer("weight", head.weight.clone())
        self.logit_bias = head.logit_bias
        self.adapter = copy.deepcopy(artifact.adapter)
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter.task_logits(features @ self.weight.T + self.logit_bias)


class ZeroShotTaskHead(nn.Module):
    """Image features (N, d) -> the K task logits of the plain zero-shot head: the target
    model without any adapter, the baseline every deployed overhead is measured against."""

    def __init__(self, head: ZeroShotHead) -> None:
        super().__init__()
        self.register_buffer("weight", head.weight[: head.num_task_classes].clone())
        self.logit_bias = head.logit_bias
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features @ self.weight.T
        return logits + self.logit_bias if self.logit_bias else logits


class Normalise(nn.Module):
    """L2 normalisation of the image feature, kept fp32 in every export."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1)


class DeployedClassifier(nn.Module):
    """Pixels (N, 3, H, W) -> task logits (N, K), or probabilities with ``softmax=True``."""

    def __init__(self, visual: nn.Module, head: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.normalise = Normalise()
        self.head = head
        self.softmax = softmax
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.normalise(self.visual(pixel_values)))
        return logits.softmax(dim=-1) if self.softmax else logits
