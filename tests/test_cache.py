import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from transmiter_deploy.features.cache import build_cache, check_same_images, load_cache, zero_shot_logits
from transmiter_deploy.features.datasets import open_dataset
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.heads import build_head
from transmiter_deploy.features.models import ModelSpec, load_model

from conftest import draw_image, make_image_folder


@pytest.fixture(scope="module")
def tiny_vit():
    return load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))


@pytest.fixture(scope="module")
def tiny_rn():
    return load_model(ModelSpec("TM-Tiny-RN", init_seed=0))


def test_folder_cache_round_trip_matches_direct_encoding(tiny_vit, image_folder, tmp_path):
    dataset = open_dataset(image_folder)
    assert dataset.class_names == ["blue", "green", "red", "yellow"]
    build_cache(tiny_vit, dataset, tmp_path / "c", batch_size=5, shard_size=4, progress=False)
    cache = load_cache(tmp_path / "c")
    assert len(cache) == 12
    assert len(list((tmp_path / "c").glob("features-*.safetensors"))) == 3
    assert cache.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert cache.model == tiny_vit.identity
    from PIL import Image

    first = tiny_vit.preprocess(Image.open(image_folder / "blue" / "000.png").convert("RGB")).unsqueeze(0)
    assert torch.allclose(cache.features[0], tiny_vit.encode_images(first)[0], atol=1e-5)
    assert torch.allclose(cache.features.norm(dim=1), torch.ones(12), atol=1e-5)
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert manifest["preprocess"]["image_size"] == [32, 32]
    assert manifest["dataset"]["num_samples"] == 12


def test_fingerprint_pairs_caches_of_the_same_images(tiny_vit, tiny_rn, image_folder, tmp_path):
    dataset = open_dataset(image_folder)
    build_cache(tiny_vit, dataset, tmp_path / "vit", progress=False)
    build_cache(tiny_rn, dataset, tmp_path / "rn", progress=False)
    vit, rn = load_cache(tmp_path / "vit"), load_cache(tmp_path / "rn")
    assert vit.fingerprint == rn.fingerprint
    check_same_images(vit, rn)
    draw_image((1, 2, 3), seed=999).save(image_folder / "red" / "001.png")  # change one image
    build_cache(tiny_rn, open_dataset(image_folder), tmp_path / "rn2", progress=False)
    with pytest.raises(InputError, match="different images"):
        check_same_images(vit, load_cache(tmp_path / "rn2"))


def test_csv_dataset_with_class_order_and_unlabelled_rows(tiny_vit, image_folder, tmp_path):
    csv_path = image_folder / "list.csv"
    csv_path.write_text("path,label\nred/000.png,red\nblue/001.png,blue\ngreen/002.png,\n")
    dataset = open_dataset(csv_path, class_names=["red", "green", "blue"])
    assert [r.label for r in dataset.records] == [0, 2, -1]
    build_cache(tiny_vit, dataset, tmp_path / "c", progress=False)
    assert load_cache(tmp_path / "c").labels.tolist() == [0, 2, -1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\nred/000.png,red\n", "needs a 'path' column"),
        ("path,label\nred/000.png,purple\n", "unknown label 'purple'"),
        ("path,label\n../outside.png,red\n", "outside the dataset root"),
        ("path,label\nred/404.png,red\n", "file not found"),
        ("path,label\n", "no rows"),
    ],
)
def test_bad_csv_rows_are_named(image_folder, content, message):
    (image_folder.parent / "outside.png").write_bytes((image_folder / "red" / "000.png").read_bytes())
    csv_path = image_folder / "list.csv"
    csv_path.write_text(content)
    with pytest.raises(InputError, match=message):
        open_dataset(csv_path, class_names=["red", "green", "blue"])


def test_bad_dataset_directories(tmp_path, tiny_vit):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        open_dataset(tmp_path / "empty")
    root = make_image_folder(tmp_path / "stray")
    (root / "red" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image file.*notes.txt"):
        open_dataset(root)
    with pytest.raises(InputError, match="dataset not found"):
        open_dataset(tmp_path / "missing")
    corrupt = make_image_folder(tmp_path / "corrupt")
    (corrupt / "red" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="cannot decode image .*001.png"):
        build_cache(tiny_vit, open_dataset(corrupt), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.*"))  # no half-written cache left behind
    (corrupt / "red" / "001.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        build_cache(tiny_vit, open_dataset(corrupt), tmp_path / "c", progress=False)


def test_flat_directory_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        draw_image((200, 0, 0), seed=i).save(root / f"{i}.png")
    dataset = open_dataset(root)
    assert dataset.class_names == [] and {r.label for r in dataset.records} == {-1}


def test_tampered_shard_and_nan_features_are_refused(tiny_vit, image_folder, tmp_path):
    build_cache(tiny_vit, open_dataset(image_folder), tmp_path / "c", progress=False)
    shard = tmp_path / "c" / "features-00000.safetensors"
    backup = tmp_path / "backup.safetensors"
    shutil.copy(shard, backup)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="sha256"):
        load_cache(tmp_path / "c")
    # a NaN written by someone who also updated the hash is still caught
    tensors = {"features": torch.full((12, 64), float("nan")), "labels": torch.zeros(12, dtype=torch.int64)}
    save_file(tensors, shard)
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    from transmiter_deploy.artifacts import sha256_file

    manifest["shards"][0]["sha256"] = sha256_file(shard)
    (tmp_path / "c" / "cache.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="NaN"):
        load_cache(tmp_path / "c")


def test_cache_and_head_must_match(tiny_vit, tiny_rn, image_folder, tmp_path):
    build_cache(tiny_vit, open_dataset(image_folder), tmp_path / "c", progress=False)
    cache = load_cache(tmp_path / "c")
    good = build_head(tiny_vit, cache.class_names, ["tree"], ("a {}.",), progress=False)
    assert zero_shot_logits(cache, good).shape == (12, 5)
    other_model = build_head(tiny_rn, cache.class_names, ["tree"], ("a {}.",), progress=False)
    with pytest.raises(InputError, match="was made by TM-Tiny-ViT"):
        zero_shot_logits(cache, other_model)
    reordered = build_head(tiny_vit, list(reversed(cache.class_names)), ["tree"], ("a {}.",), progress=False)
    with pytest.raises(InputError, match="class lists differ"):
        zero_shot_logits(cache, reordered)
