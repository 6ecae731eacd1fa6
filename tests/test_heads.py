import pytest
import torch

from transmiter_deploy.errors import InputError
from transmiter_deploy.features.heads import build_head, load_head, save_head
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.features.templates import resolve_templates
from transmiter_deploy.features.vocabulary import builtin_vocabulary, select_auxiliary


def test_vocabulary_is_a_few_thousand_unique_nouns():
    words = builtin_vocabulary()
    assert 2000 <= len(words) <= 10000
    assert len(set(words)) == len(words)
    assert "dog" in words and "bicycle" in words


def test_auxiliary_selection_is_seeded_and_avoids_task_names():
    task = ["dog", "Bicycle", "golden_retriever"]
    first = select_auxiliary(task, 64, seed=0)
    assert first == select_auxiliary(task, 64, seed=0)
    assert first != select_auxiliary(task, 64, seed=1)
    assert len(first) == 61 and len(set(first)) == 61
    assert not {"dog", "bicycle"} & {w.lower() for w in first}
    assert select_auxiliary(task, 3, seed=0) == []
    with pytest.raises(InputError, match="do not fit"):
        select_auxiliary(task, 2, seed=0)
    with pytest.raises(InputError, match="only"):
        select_auxiliary(task, 100_000, seed=0)
    own = select_auxiliary(task, 6, seed=0, vocabulary=["red star", "dog", "blue ring", "bicycle", "cyan cross"])
    assert sorted(own) == ["blue ring", "cyan cross", "red star"]


def test_templates_builtin_and_file(tmp_path):
    assert len(resolve_templates("openai")) == 80
    assert all("{}" in t for t in resolve_templates("simple"))
    path = tmp_path / "t.txt"
    path.write_text("a photo of {}.\n\na drawing of {}.\n")
    assert resolve_templates(str(path)) == ("a photo of {}.", "a drawing of {}.")
    path.write_text("no placeholder\n")
    with pytest.raises(InputError, match="exactly one"):
        resolve_templates(str(path))
    with pytest.raises(InputError, match="neither"):
        resolve_templates("nonexistent-set")


@pytest.fixture(scope="module")
def tiny_vit():
    return load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))


def test_head_rows_are_scaled_unit_template_means(tiny_vit, tmp_path):
    templates = ("a photo of a {}.", "a drawing of a {}.")
    head = build_head(tiny_vit, ["cat", "dog"], ["tree"], templates, progress=False)
    assert head.weight.shape == (3, 64)
    norms = head.weight.norm(dim=1)
    assert torch.allclose(norms, torch.full((3,), tiny_vit.logit_scale), rtol=1e-5)
    expected = tiny_vit.encode_texts(["a photo of a dog.", "a drawing of a dog."]).mean(0)
    expected = expected / expected.norm() * tiny_vit.logit_scale
    assert torch.allclose(head.weight[1], expected, atol=1e-5)
    save_head(head, tmp_path / "h")
    loaded = load_head(tmp_path / "h")
    assert torch.equal(loaded.weight, head.weight)
    assert loaded.all_class_names == ["cat", "dog", "tree"]
    assert loaded.model == tiny_vit.identity
    assert loaded.templates == templates


def test_head_refuses_duplicate_classes(tiny_vit):
    with pytest.raises(InputError, match="duplicate"):
        build_head(tiny_vit, ["cat", "cat"], [], ("{}",), progress=False)


def test_unknown_model_lists_close_matches():
    with pytest.raises(InputError, match="close matches: ViT-B-16"):
        load_model(ModelSpec("ViT-B-61"))


def test_pickle_checkpoints_are_refused(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="not a .safetensors"):
        load_model(ModelSpec("TM-Tiny-ViT", checkpoint=checkpoint))


def test_random_init_is_seeded(tiny_vit):
    again = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    other = load_model(ModelSpec("TM-Tiny-ViT", init_seed=1))
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny_vit.encode_images(pixels), again.encode_images(pixels))
    assert not torch.equal(tiny_vit.encode_images(pixels), other.encode_images(pixels))
    assert tiny_vit.identity != other.identity
