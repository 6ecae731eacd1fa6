"""Loading open_clip models and naming them precisely.

A :class:`ModelIdentity` says exactly which weights produced a cache, a head
or an adapter (architecture name + pretrained tag, or checkpoint hash, or the
seed of a random initialisation). Every later step compares identities so a
cache from one model can never be combined with the head of another.
"""

from __future__ import annotations

import difflib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from torch import nn

from ..artifacts import sha256_file
from ..errors import InputError, IntegrityError


def register_packaged_configs() -> None:
    """Make the architectures shipped in ``model_configs/`` known to open_clip.

    They are small real open_clip architectures (tiny ViT and ModifiedResNet
    towers) used by the tests and smoke runs; open_clip itself ships none
    that small.
    """
    register_architectures(Path(str(resources.files("transmiter_deploy").joinpath("model_configs"))))


# Tokenizers of architectures registered with their own (the demo world's word-level one):
# architecture name -> factory. Every other name gets open_clip's tokenizer.
_TOKENIZERS: dict[str, Callable[[], Callable]] = {}


def register_architectures(config_dir: Path, tokenizer: Callable[[], Callable] | None = None) -> None:
    """Make open_clip know the architectures in ``config_dir`` (``<name>.json`` each).

    Layers above this one (the demo world) register their own models this way,
    with the tokenizer their text towers read; this module never imports them.
    """
    names = [entry.stem for entry in Path(config_dir).glob("*.json")]
    if not all(name in open_clip.list_models() for name in names):
        open_clip.add_model_config(Path(config_dir))
    if tokenizer is not None:
        _TOKENIZERS.update({name: tokenizer for name in names})


def architecture_config(name: str) -> dict[str, Any]:
    """The open_clip configuration ``name`` is built from, to rebuild it in another process (a
    Ray worker) where the layers that registered it were never imported."""
    check_model_name(name)
    return open_clip.get_model_config(name)


def register_architecture_config(name: str, config: dict[str, Any]) -> None:
    """Make open_clip know ``name`` from its configuration (see :func:`architecture_config`),
    unless it knows it already."""
    register_packaged_configs()
    if name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"{name}.json").write_text(json.dumps(config), encoding="utf-8")
        open_clip.add_model_config(Path(folder) / f"{name}.json")


# open_clip resize modes: shortest side to size then centre crop; longest side
# to size then centre pad (fill_color); both sides to size (aspect not kept).
CROP_AFTER_RESIZE = {"shortest": "center", "longest": "pad-center", "squash": "none"}


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    pretrained: str | None = None
    checkpoint_sha256: str | None = None
    init_seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, where: str) -> "ModelIdentity":
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise IntegrityError(f"{where}: model identity must be an object with a 'name'")
        try:
            identity = cls(**payload)
        except TypeError as exc:
            raise IntegrityError(f"{where}: bad model identity: {exc}") from exc
        for key, kind in (("pretrained", str), ("checkpoint_sha256", str), ("init_seed", int)):
            value = getattr(identity, key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise IntegrityError(f"{where}: model identity's {key} must be a {kind.__name__} or null")
        return identity

    def describe(self) -> str:
        if self.checkpoint_sha256:
            return f"{self.name} (checkpoint sha256 {self.checkpoint_sha256[:12]})"
        if self.pretrained:
            return f"{self.name} ({self.pretrained})"
        return f"{self.name} (random init, seed {self.init_seed})"


@dataclass(frozen=True)
class ModelSpec:
    """What the user names: an open_clip architecture and where its weights come from.

    Exactly one of ``pretrained`` (an open_clip tag, read from the Hugging Face
    cache), ``checkpoint`` (a local safetensors file) or neither (random
    weights from ``init_seed``, valid for shapes and speed, not accuracy).
    """

    name: str
    pretrained: str | None = None
    checkpoint: Path | None = None
    init_seed: int = 0


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    identity: ModelIdentity
    preprocess_config: dict[str, Any]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (float32)."""
        return self.model.encode_image(pixels, normalize=True).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text features (float32)."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device), normalize=True).float()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def known_models() -> list[str]:
    register_packaged_configs()
    return list(open_clip.list_models())


def check_model_name(name: str) -> None:
    models = known_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=4, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise InputError(f"open_clip does not know model '{name}'{hint}")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # open_clip warns on the root logger for every random init, which is
    # intended here; restore the caller's level afterwards.
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(previous)


def tokenizer_for(name: str) -> Callable:
    """The tokenizer registered with the architecture, else open_clip's."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]()
    return open_clip.get_tokenizer(name)


def load_model(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """Build an open_clip model in eval mode, with its preprocessing and tokenizer."""
    check_model_name(spec.name)
    if spec.pretrained and spec.checkpoint:
        raise InputError("give either a pretrained tag or a checkpoint, not both")
    pretrained: str | None = None
    identity = ModelIdentity(spec.name, init_seed=spec.init_seed)
    if spec.checkpoint is not None:
        checkpoint = Path(spec.checkpoint)
        if not checkpoint.is_file():
            raise InputError(f"checkpoint not found: {checkpoint}")
        if checkpoint.suffix != ".safetensors":
            # Pickle-based checkpoints can run code when loaded; we never load them.
            raise InputError(
                f"checkpoint {checkpoint} is not a .safetensors file; convert it first "
                "(safetensors.torch.save_file(state_dict, 'model.safetensors'))"
            )
        pretrained = str(checkpoint)
        identity = ModelIdentity(spec.name, checkpoint_sha256=sha256_file(checkpoint))
    elif spec.pretrained:
        if spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
            raise InputError(f"model '{spec.name}' has no pretrained tag '{spec.pretrained}' (known: {tags})")
        pretrained = spec.pretrained
        identity = ModelIdentity(spec.name, pretrained=spec.pretrained)

    with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, device=device
            )
        except (RuntimeError, FileNotFoundError, OSError, ValueError, KeyError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot load model {identity.describe()}: {message}") from exc
    model.eval()
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", {}))
    size = cfg.get("size", getattr(visual, "image_size", 224))
    preprocess_config = {
        "image_size": list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)],
        "mean": list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        # what follows the resize in open_clip's eval transform, spelled out for
        # runtimes that reimplement it (C++, mobile)
        "crop": CROP_AFTER_RESIZE.get(cfg.get("resize_mode", "shortest"), "center"),
        "rescale_factor": 1 / 255,  # uint8 pixels to [0, 1], then (x - mean) / std per channel
        "layout": "NCHW",
        "color_order": "RGB",
    }
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer_for(spec.name),
        identity=identity,
        preprocess_config=preprocess_config,
    )
