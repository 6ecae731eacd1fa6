"""Loading open_clip models and naming them precisely.

A :class:`ModelIdentity` says exactly which weights produced a cache, a head
or an adapter (architecture name + pretrained tag, or checkpoint hash, or the
seed of a random initialisation). Every later step compares identities so a
cache from one model can never be combined with the head of another.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import open_clip
import torch
from torch import nn

from ..artifacts import sha256_file
from ..errors import DependencyError, InputError, IntegrityError
from .tiny_towers import register_tiny_timm_towers


def register_packaged_configs() -> None:
    """Make the architectures shipped in ``model_configs/`` known to open_clip.

    They are small real open_clip architectures used by the tests and smoke runs, one per family
    whose image tower takes its own code path (ViT, ModifiedResNet, and the timm-built EVA02,
    ConvNeXt, SigLIP, SigLIP2 and MobileCLIP of :mod:`.tiny_towers`); open_clip itself ships
    none that small.
    """
    register_tiny_timm_towers()
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

    @property
    def feature_dim(self) -> int:
        """The width of the image features: open_clip's ``embed_dim``, which every image tower
        projects to (its own towers say it as ``output_dim``; timm-built ones do not)."""
        output = getattr(self.model.visual, "output_dim", None)
        if output is not None:
            return int(output)
        return int(open_clip.get_model_config(self.identity.name)["embed_dim"])

    @property
    def logit_bias(self) -> float:
        """SigLIP's learnt logit bias (logits = scale * cos + bias); 0 for CLIP's families."""
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach().reshape(-1)[0])


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


def tokenizer_for(name: str, random_weights: bool = False) -> Callable:
    """The tokenizer registered with the architecture, else open_clip's, built when it is first
    called (:class:`LazyTokenizer`); ``random_weights`` allows a :class:`StandInTokenizer` where
    open_clip's cannot be built offline."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]()
    return LazyTokenizer(name, stand_in_allowed=random_weights)


class LazyTokenizer:
    """open_clip's tokenizer of a model, built on its first call: building SigLIP's imports
    ``transformers`` and reads the Hugging Face cache, and image-only work (``transmiter cache``,
    an export's image tower) never encodes text, so it must not need either. A missing package is
    DependencyError (exit 3) naming what to install, a tokenizer missing from the offline cache
    InputError; a model of random weights (shapes and speed only, no meaning in its text tower)
    gets a :class:`StandInTokenizer` instead, and :attr:`stand_in` says why."""

    def __init__(self, name: str, stand_in_allowed: bool = False) -> None:
        self.name = name
        self.stand_in_allowed = stand_in_allowed
        self.built: Callable | None = None
        self.stand_in: str | None = None  # what tokenizes instead of open_clip's, and why

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.build()(texts)

    def build(self) -> Callable:
        """The tokenizer itself (open_clip's, or the stand-in), built on the first call."""
        if self.built is None:
            self.built = self._build()
        return self.built

    def _build(self) -> Callable:
        try:
            return open_clip.get_tokenizer(self.name)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            problem = f"needs {missing}, which is not installed"
            if not self.stand_in_allowed:
                raise DependencyError(f"the tokenizer of {self.name} {problem} ({HF_TOKENIZERS_INSTALL})") from exc
        except (OSError, ValueError) as exc:  # Hugging Face: not in the cache and the hub unreachable
            problem = f"could not be loaded ({_first_line(exc)})"
            if not self.stand_in_allowed:
                raise InputError(f"the tokenizer of {self.name} {problem}; with HF_HUB_OFFLINE=1 it must be "
                                 "in the Hugging Face cache") from exc
        text_cfg = (open_clip.get_model_config(self.name) or {}).get("text_cfg", {})
        stand_in = StandInTokenizer(int(text_cfg.get("vocab_size", 49408)), int(text_cfg.get("context_length", 77)))
        self.stand_in = f"{stand_in.describe()}: open_clip's tokenizer of {self.name} {problem}"
        return stand_in


class StandInTokenizer:
    """Texts to token ids for a text tower of random weights whose own tokenizer is unavailable:
    each word hashed (sha256) to an id in [1, vocab_size - 2], then vocab_size - 1 as the end
    token (the largest id, where CLIP-style towers that pool at the argmax token look), padded
    with 0 to the context length. Deterministic across processes; meaningless as language, which
    a random-weight model's text tower is anyway."""

    def __init__(self, vocab_size: int, context_length: int) -> None:
        if vocab_size < 3 or context_length < 2:
            raise InputError(f"a stand-in tokenizer needs a vocabulary of 3+ and a context of 2+, "
                             f"got {vocab_size} and {context_length}")
        self.vocab_size, self.context_length = vocab_size, context_length

    def describe(self) -> str:
        return f"stand-in tokenizer (hashed words, vocabulary {self.vocab_size}, context {self.context_length})"

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1 + int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
                     % (self.vocab_size - 2) for word in text.lower().split()][: self.context_length - 1]
            ids[row, : len(words) + 1] = torch.tensor(words + [self.vocab_size - 1])
        return ids


def stand_in_description(tokenizer: Callable) -> str | None:
    """What a model's texts were tokenized by when it was not the model's own tokenizer."""
    return getattr(tokenizer, "stand_in", None)


def stand_in_tokenizer_of(spec: ModelSpec) -> str | None:
    """What :func:`stand_in_description` will say of ``spec``'s tokenizer, without loading the
    model: None for weights of meaning (pretrained, a checkpoint), which never get a stand-in, and
    for random weights whose own tokenizer can be built here. A step that encodes the model's texts
    keys on it, so that its output is made again once the own tokenizer can be built."""
    if spec.pretrained or spec.checkpoint is not None:
        return None
    tokenizer = tokenizer_for(spec.name, random_weights=True)
    if isinstance(tokenizer, LazyTokenizer):
        tokenizer.build()
    return stand_in_description(tokenizer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


HF_TOKENIZERS_INSTALL = "pip install 'transmiter-deploy[hf-tokenizers]'"


def _weights_source(spec: ModelSpec) -> tuple[str | None, ModelIdentity]:
    """What open_clip is given as ``pretrained`` (a tag, a checkpoint path, or None for random
    weights) and the identity of those weights; a bad name, tag or checkpoint is refused here."""
    check_model_name(spec.name)
    if spec.pretrained and spec.checkpoint:
        raise InputError("give either a pretrained tag or a checkpoint, not both")
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
        return str(checkpoint), ModelIdentity(spec.name, checkpoint_sha256=sha256_file(checkpoint))
    if spec.pretrained:
        if spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
            raise InputError(f"model '{spec.name}' has no pretrained tag '{spec.pretrained}' (known: {tags})")
        return spec.pretrained, ModelIdentity(spec.name, pretrained=spec.pretrained)
    return None, ModelIdentity(spec.name, init_seed=spec.init_seed)


def _preprocess_config(visual: nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(visual, "preprocess_cfg", {}))
    size = cfg.get("size", getattr(visual, "image_size", 224))
    return {
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


class ImageTower(nn.Module):
    """A CLIP's image tower alone (``visual``, ``logit_scale``), with CLIP's ``encode_image``:
    what deploying needs once the heads are computed. The text tower of ViT-bigG-14 alone is
    ~700 M parameters (2.8 GB in fp32) that an image-only export never runs."""

    def __init__(self, visual: nn.Module, logit_scale: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        raise InputError("this model was loaded as an image tower alone: text features need the whole model")


def load_image_tower(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """The image tower of ``spec`` alone, with the weights, preprocessing and identity the whole
    model would have (same seed, same visual weights: CLIP builds its image tower first).

    Random weights and safetensors checkpoints never build the text tower (a checkpoint's
    ``visual.*`` tensors are read alone). A pretrained tag goes through open_clip's own loader,
    which reads the whole file: the text tower is built, then dropped."""
    pretrained, identity = _weights_source(spec)
    config = open_clip.get_model_config(spec.name)
    # timm-built towers too (EVA02, ConvNeXt, SigLIP, MobileCLIP): CLIP and CustomTextCLIP build the
    # image tower first, with the same builder (tests/test_image_tower.py compares them)
    tower_alone = config is not None and (pretrained is None or spec.checkpoint is not None)
    if not tower_alone:  # a pretrained tag: open_clip's loader, then the text tower dropped
        whole = load_model(spec, device)
        whole.model = ImageTower(whole.model.visual, whole.model.logit_scale)
        whole.tokenizer = _no_tokenizer
        return whole
    # open_clip has no public builder of one tower: CLIP.__init__ calls this one for its image tower
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg, image_transform_v2

    with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        try:
            visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"],
                                         quick_gelu=config.get("quick_gelu", False), cast_dtype=None)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot build the image tower of {identity.describe()}: {exc}") from exc
    logit_scale = torch.tensor(float(config.get("init_logit_scale", np.log(1 / 0.07))))  # CLIP's initial value
    if spec.checkpoint is not None:
        visual_state, logit_scale = _read_image_tower(Path(spec.checkpoint), logit_scale)
        try:
            visual.load_state_dict(visual_state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"checkpoint {spec.checkpoint} does not fit {spec.name}'s image tower: {first}") from exc
    preprocess_cfg = asdict(PreprocessCfg())
    preprocess_cfg.update(config.get("preprocess_cfg", {}))
    preprocess_cfg["size"] = visual.image_size
    visual.preprocess_cfg = preprocess_cfg
    model = ImageTower(visual, logit_scale).to(device).eval()
    return LoadedModel(model=model, preprocess=image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False),
                       tokenizer=_no_tokenizer, identity=identity, preprocess_config=_preprocess_config(visual))


def _no_tokenizer(texts: list[str]) -> torch.Tensor:
    raise InputError("this model was loaded as an image tower alone: text features need the whole model")


def _read_image_tower(checkpoint: Path, logit_scale: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``visual.*`` tensors of a safetensors checkpoint (and its logit scale), read alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            keys = list(handle.keys())
            prefix = "module.visual." if any(key.startswith("module.visual.") for key in keys) else "visual."
            state = {key[len(prefix):]: handle.get_tensor(key) for key in keys if key.startswith(prefix)}
            for name in ("logit_scale", "module.logit_scale"):
                if name in keys:
                    logit_scale = handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"checkpoint {checkpoint} is not a readable safetensors file: {exc}") from exc
    if not state:
        raise InputError(f"checkpoint {checkpoint} has no image tower tensors (no 'visual.*' keys)")
    return state, logit_scale


def load_model(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """Build an open_clip model in eval mode, with its preprocessing and tokenizer."""
    pretrained, identity = _weights_source(spec)
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
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer_for(spec.name, random_weights=identity.init_seed is not None),
        identity=identity,
        preprocess_config=_preprocess_config(model.visual),
    )
