"""Hostile inputs users and disks produce: odd images, broken files, pickles posing as tensors.

Each case goes through the real CLI or library entry point and requires either a correct result
or one line naming the problem with the documented exit status, and no partial output.
"""

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transmiter_deploy.artifacts import load_tensors
from transmiter_deploy.features.cache import load_cache
from transmiter_deploy.cli import main
from transmiter_deploy.features.datasets import decode_image
from transmiter_deploy.errors import IntegrityError


def run(capsys, *args: str) -> tuple[int, str]:
    status = main(list(args))
    err = capsys.readouterr().err.strip()
    return status, err


def cache_args(data: Path, out: Path) -> list[str]:
    return ["--quiet", "cache", "--model", "TM-Tiny-ViT", "--init-seed", "0", "--data", str(data), "--out", str(out)]


def huge_header_png(path: Path, side: int = 20_000) -> None:
    """A valid PNG header claiming side x side pixels, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def odd_images(tmp_path) -> Path:
    """Decodable but unusual images: CMYK, 16-bit, greyscale, palette, alpha, 1 x 1."""
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(root / "a" / "cmyk.jpg")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(root / "a" / "sixteen.png")
    Image.new("L", (40, 40), 90).save(root / "a" / "grey.png")
    Image.new("P", (16, 16)).save(root / "b" / "palette.png")
    Image.new("RGBA", (16, 16), (10, 200, 30, 128)).save(root / "b" / "alpha.png")
    Image.new("RGB", (1, 1), (250, 10, 10)).save(root / "b" / "tiny.png")
    return root


def test_unusual_but_valid_images_are_cached(odd_images, tmp_path, capsys):
    status, err = run(capsys, *cache_args(odd_images, tmp_path / "cache"))
    assert status == 0, err
    cache = load_cache(tmp_path / "cache")
    assert len(cache) == 6 and np.isfinite(cache.features.numpy()).all()


def test_sixteen_bit_images_keep_their_contrast(odd_images):
    image, _ = decode_image(odd_images / "a" / "sixteen.png")
    pixels = np.asarray(image)[..., 0].astype(int)
    source = np.asarray(Image.open(odd_images / "a" / "sixteen.png"), dtype=np.int64)
    assert np.array_equal(pixels, source >> 8)  # not clipped to white
    assert pixels.min() == 0 and pixels.max() > 200


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: huge_header_png(p), "decompression bomb"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png"), "cannot decode image"),
    (lambda p: p.write_bytes(b""), "image file is empty"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "cannot decode image"),
])
def test_undecodable_images_stop_the_cache_with_one_line(odd_images, tmp_path, capsys, make_bad, message):
    make_bad(odd_images / "b" / "bad.png")
    status, err = run(capsys, *cache_args(odd_images, tmp_path / "cache"))
    assert status == 2 and err.count("\n") == 0 and message in err and "bad.png" in err
    assert not (tmp_path / "cache").exists()


def test_empty_dataset_directory_and_empty_class_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    status, err = run(capsys, *cache_args(tmp_path / "empty", tmp_path / "cache"))
    assert status == 2 and "is empty" in err
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "a" / "x.png")
    status, err = run(capsys, *cache_args(tmp_path / "classes", tmp_path / "cache"))
    assert status == 2 and "has no images" in err and not (tmp_path / "cache").exists()


class WritesAFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_posing_as_safetensors_is_refused_and_never_unpickled(tmp_path):
    trap = tmp_path / "unpickled.txt"
    fake = tmp_path / "adapter.safetensors"
    fake.write_bytes(pickle.dumps({"weight": WritesAFileWhenUnpickled(str(trap))}))
    with pytest.raises(IntegrityError, match="not a valid safetensors file"):
        load_tensors(fake, None, "adapter weights")
    assert not trap.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_damaged_cache_shards_are_refused(odd_images, tmp_path, capsys, damage):
    assert run(capsys, *cache_args(odd_images, tmp_path / "cache"))[0] == 0
    shard = next((tmp_path / "cache").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        load_cache(tmp_path / "cache")


def test_interrupted_cache_write_leaves_the_previous_cache_intact(odd_images, tmp_path, capsys, monkeypatch):
    assert run(capsys, *cache_args(odd_images, tmp_path / "cache"))[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    import transmiter_deploy.features.cache as cache_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C while the shard was being written

    monkeypatch.setattr(cache_module, "save_tensors", crash)
    (odd_images / "a" / "extra.png").write_bytes((odd_images / "a" / "grey.png").read_bytes())
    assert main(cache_args(odd_images, tmp_path / "cache")) == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    assert len(load_cache(tmp_path / "cache")) == 6
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
