"""An image tower loaded alone (features/models.py:load_image_tower) is the whole model's image
tower: same weights, preprocessing, identity and features, without the text tower."""

import pytest
import torch
from safetensors.torch import save_file

from transmiter_deploy.demo.weights import demo_model_spec, shipped_weights_dir
from transmiter_deploy.errors import InputError
from transmiter_deploy.features.models import ImageTower, ModelSpec, load_image_tower, load_model


def _same_tower(spec: ModelSpec) -> None:
    whole, alone = load_model(spec), load_image_tower(spec)
    assert isinstance(alone.model, ImageTower) and not hasattr(alone.model, "transformer")
    expected, got = whole.model.visual.state_dict(), alone.model.visual.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert alone.identity == whole.identity and alone.preprocess_config == whole.preprocess_config
    assert float(alone.model.logit_scale) == float(whole.model.logit_scale.detach())
    pixels = torch.rand(2, 3, *whole.preprocess_config["image_size"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(alone.encode_images(pixels), whole.encode_images(pixels))
    assert alone.feature_dim == whole.feature_dim == alone.encode_images(pixels).shape[1]  # timm towers too
    assert alone.model.visual.training is False


@pytest.mark.parametrize("name,seed", [("TM-Tiny-ViT", 3), ("TM-Tiny-RN", 1), ("TM-Tiny-SigLIP2", 2),
                                       ("TM-Tiny-EVA02", 0), ("TM-Tiny-ConvNeXt", 0), ("TM-Tiny-MobileCLIP", 0)])
def test_random_weights_match_the_whole_models_image_tower(name, seed):
    _same_tower(ModelSpec(name, init_seed=seed))


def test_a_checkpoints_image_tower_is_read_alone_and_matches():
    _same_tower(demo_model_spec(shipped_weights_dir(), "TM-Demo-Target"))


def test_text_features_are_refused_in_one_line():
    alone = load_image_tower(ModelSpec("TM-Tiny-ViT", init_seed=0))
    with pytest.raises(InputError, match="image tower alone"):
        alone.encode_texts(["a photo"])


def test_a_checkpoint_without_an_image_tower_or_of_another_shape_is_refused(tmp_path):
    whole = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0)).model.state_dict()
    text_only = {key: value for key, value in whole.items() if not key.startswith("visual.")}
    save_file({k: v.contiguous() for k, v in text_only.items()}, tmp_path / "text.safetensors")
    with pytest.raises(InputError, match="no image tower tensors"):
        load_image_tower(ModelSpec("TM-Tiny-ViT", checkpoint=tmp_path / "text.safetensors"))
    other = load_model(ModelSpec("TM-Tiny-RN", init_seed=0)).model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "rn.safetensors")
    with pytest.raises(InputError, match="does not fit TM-Tiny-ViT's image tower"):
        load_image_tower(ModelSpec("TM-Tiny-ViT", checkpoint=tmp_path / "rn.safetensors"))


def test_a_hugging_face_tokenizer_is_built_only_when_text_is_encoded(tmp_path):
    """SigLIP's text side: open_clip builds its tokenizer from Hugging Face (``transformers``),
    which image-only work (feature caches, the image tower's export) must not need. A tiny model
    with SigLIP's text configuration (its hf_tokenizer_name) loads and encodes images; encoding
    text without transformers is exit 3 naming the extra for a model of real weights (here a
    checkpoint), and a stand-in tokenizer, said so, for a model of random weights."""
    import importlib.util
    import json

    from safetensors.torch import save_file

    from transmiter_deploy.errors import DependencyError
    from transmiter_deploy.features.models import register_architectures, stand_in_description

    config = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
              "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                           "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 1,
                           "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}}
    (tmp_path / "TM-Test-HF-Tokenizer.json").write_text(json.dumps(config))
    register_architectures(tmp_path)
    model = load_model(ModelSpec("TM-Test-HF-Tokenizer", init_seed=0))
    assert model.encode_images(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    assert stand_in_description(model.tokenizer) is None  # nothing built yet
    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed: the refusal cannot be seen here")
    assert model.encode_texts(["a photo of a cat"]).shape == (1, 32)
    assert stand_in_description(model.tokenizer).endswith(
        "open_clip's tokenizer of TM-Test-HF-Tokenizer needs transformers, which is not installed")
    save_file({key: value.contiguous() for key, value in model.model.state_dict().items()}, tmp_path / "real.safetensors")
    real = load_model(ModelSpec("TM-Test-HF-Tokenizer", checkpoint=tmp_path / "real.safetensors"))
    with pytest.raises(DependencyError, match=r"^the tokenizer of TM-Test-HF-Tokenizer needs transformers, which is "
                                              r"not installed \(pip install 'transmiter-deploy\[hf-tokenizers\]'\)$"):
        real.encode_texts(["a photo of a cat"])
