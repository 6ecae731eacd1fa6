"""Image towers in their inference form before tracing: train-time branches fused.

MobileCLIP's towers (timm's FastViT MCi: MobileOne and RepMixer blocks, re-parameterisable large
kernel convolutions) train with parallel convolution and BatchNorm branches that fold into one
convolution for inference; traced as they are, the graph computes every branch. timm ships the
folding (``timm.utils.reparameterize_model``: each module's ``reparameterize``, ``fuse`` or
``switch_to_deploy``), which is what runs here; towers without such modules are returned as they
are. The export compares the folded tower's graph with the unfolded PyTorch tower
(deploy/onnx_export.py, deploy/bank.py), so the fold is checked on every export.
"""

from __future__ import annotations

from torch import nn

# the methods timm's reparameterize_model calls: a module with one of them has an inference form
REPARAMETERISING_METHODS = ("reparameterize", "fuse", "switch_to_deploy")


def reparameterisable(tower: nn.Module) -> int:
    """How many modules of ``tower`` fold into an inference form."""
    return sum(1 for module in tower.modules() if any(hasattr(module, m) for m in REPARAMETERISING_METHODS))


def for_inference(tower: nn.Module) -> tuple[nn.Module, int]:
    """``(module, folded)``: ``tower`` itself when nothing in it folds (``folded`` 0), else a
    reparameterised copy in eval mode (``tower`` is left as it was, the reference of parity)."""
    folded = reparameterisable(tower)
    if not folded:
        return tower, 0
    from timm.utils import reparameterize_model

    return reparameterize_model(tower, inplace=False).eval(), folded
