"""EFT-style logit arithmetic: the transfer method TransMiter is compared against.

Emulated fine-tuning (Mitchell et al., 2024) moves what fine-tuning changed in
a small model onto a large one by adding the small model's change in
log-probabilities to the large model's at every input:

    log p_EFT(y | x) = log p_target(y | x) + log p_ft_source(y | x) - log p_zs_source(y | x)

Log-softmax differs from the logits by one constant per sample, which never
changes an argmax (over all classes or a subset), so the arithmetic is done on
logits. Unlike TransMiter it needs no training, but it runs the target *and*
both source image towers at inference: that cost is what the benchmark
measures.
"""

from __future__ import annotations

from typing import TypeVar

from ..errors import InputError

Logits = TypeVar("Logits")  # torch.Tensor or numpy.ndarray: the arithmetic is the same


def eft_logits(target: Logits, finetuned_source: Logits, zero_shot_source: Logits) -> Logits:
    """Task logits (N, K) of the emulated fine-tuned target."""
    shapes = {tuple(target.shape), tuple(finetuned_source.shape), tuple(zero_shot_source.shape)}
    if len(shapes) != 1:
        raise InputError(f"EFT needs three logit arrays of one shape (N, K), got {sorted(shapes)}")
    return target + finetuned_source - zero_shot_source

