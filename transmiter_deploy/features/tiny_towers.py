"""Tiny image towers of open_clip's timm-built families, for the family matrix and smoke runs.

open_clip builds the image towers of EVA02, ConvNeXt, SigLIP/SigLIP2 and MobileCLIP through timm
by name (``vision_cfg.timm_model_name``) and hands timm no size arguments, so a tiny configuration
of one of those families needs a timm name of its own. Each name below is registered with timm as
the family's real timm entrypoint called with widths, depths and image size shrunk: the same
classes and the same code path (rotary embeddings, attention-pool heads, MobileOne blocks), only
small. The open_clip configurations that use them are ``model_configs/TM-Tiny-*.json``.
"""

from __future__ import annotations

from typing import Any

# tiny timm name -> (the family's timm model it shrinks, the arguments that shrink it)
TINY_TIMM_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    # SigLIP and SigLIP2: a ViT without class token, pooled by multi-head attention ("map")
    "tm_tiny_vit_siglip": ("vit_base_patch16_siglip_224",
                           {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    # EVA02: rotary position embeddings, SwiGLU MLP, sub-LayerNorm
    "tm_tiny_eva02": ("eva02_base_patch16_clip_224",
                      {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    # ConvNeXt: depthwise 7x7 convolutions, LayerNorm over channels, four stages
    "tm_tiny_convnext": ("convnext_base", {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}),
    # MobileCLIP (FastViT MCi): MobileOne / RepMixer blocks reparameterised for inference,
    # conditional position encoding and attention in the last stage
    "tm_tiny_fastvit_mci": ("fastvit_mci1", {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)}),
}


def register_tiny_timm_towers() -> None:
    """Make timm know the names of :data:`TINY_TIMM_TOWERS` (once per process)."""
    import timm
    from timm.models import register_model

    for name, (family, shrunk) in TINY_TIMM_TOWERS.items():
        if timm.is_model(name):
            continue

        def build(pretrained: bool = False, _family: str = family, _shrunk: dict = shrunk, **kwargs):
            # open_clip's arguments (pooling, classes, drop rates) join the shrinking ones, which
            # name sizes only; where both name one, open_clip's wins
            return timm.create_model(_family, pretrained=False, **dict(_shrunk, **kwargs))

        build.__name__ = name
        build.__module__ = __name__
        register_model(build)
