"""The C++ runtime (cpp/) against Python on the demo export: head logits, preprocessing, ONNX
Runtime, the CLI's errors, and the format fuzz test under AddressSanitizer/UBSan; each on the
native builds and on the aarch64 builds under emulation (cpp_builds.py), and the aarch64 results
against the x86-64 ones.

`make test` builds cpp/ (release, and ASan+UBSan; for aarch64 too where the cross toolchain is
installed) and names each build in an environment variable: then a missing binary is a failure.
Plain `pytest` without them skips these tests with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpp_builds import CppBuild, builds, cpp_build, infer, infer_aarch64, needs_onnxruntime, run  # noqa: F401 (fixtures)
from transmiter_deploy.features.datasets import decode_image
from transmiter_deploy.runtimes.onnxruntime import ort_session

HEAD_ATOL = 1e-4  # logits, as the export's own parity checks
PIXEL_ATOL = 1e-6  # pixels where the reference is not the same preprocessing code path (bank, ONNX Runtime tests)
HEAD_FEATURES_ATOL = 1e-5  # the C++ head against head.onnx on the same features (cpp/README.md)
# An fp16 graph on aarch64 against Python's ONNX Runtime on x86-64: x86-64's CPU provider has no
# fp16 MatMul and runs the graph's fp16 GEMMs in fp32 between Casts; aarch64's has fp16 kernels
# (used where the CPU has FP16 arithmetic, as qemu's does), so logits differ by fp16 rounding:
# up to 2 fp16 ulps (2 * 2^-10) of the largest logit, with the same top-1.
FP16_AARCH64_RTOL = 2e-3


def fp16_atol(build: CppBuild, reference: np.ndarray) -> float:
    return HEAD_ATOL if build.arch == "x86_64" else FP16_AARCH64_RTOL * float(np.abs(reference).max())


# Every build that runs the head backend; the pixels tests on the release builds (ONNX Runtime is
# not instrumented, so the sanitizer builds leave that backend out), the input checks on the
# sanitizer builds and the emulated release build.
head_build = builds("release", "asan", "aarch64", "aarch64-asan")
pixels_build = builds("release", "aarch64")
checked_build = builds("asan", "aarch64", "aarch64-asan")
# The CLI's input checks and the demo-seeded format fuzz: natively under the sanitizers, and on the
# emulated release build (under qemu and ASan together they take 30 s and 150 s; the aarch64 ASan
# build runs the synthetic fuzz and the malformed bank manifests in its ctest, make cpp-aarch64).
refusing_build = builds("asan", "aarch64")


@pytest.fixture(scope="session")
def demo(demo_export):
    """The demo export, its target model and 16 of its test images."""
    from transmiter_deploy.pipeline.export_run import model_specs
    from transmiter_deploy.features.models import load_model

    recipe, outcome = demo_export
    manifest_path = outcome.export_dir / "manifest.json"
    images = sorted((outcome.out_dir / "data" / "test").glob("*/*.png"))[:16]
    assert len(images) == 16
    model = load_model(model_specs(recipe)["target"])
    return manifest_path, model, images


@pytest.fixture(scope="session")
def demo_features(demo, tmp_path_factory):
    """Raw (unnormalised) backbone features of the demo images, as an application's own CLIP gives them."""
    _, model, images = demo
    pixels = torch.stack([model.preprocess(decode_image(path)[0]) for path in images])
    with torch.no_grad():
        raw = model.model.encode_image(pixels, normalize=False).float().numpy()
    path = tmp_path_factory.mktemp("features") / "raw.npy"
    np.save(path, raw)
    return path, raw, pixels.numpy()


def python_head(manifest_path: Path, raw: np.ndarray) -> np.ndarray:
    """head.onnx through Python ONNX Runtime, on L2-normalised features (what the export feeds it)."""
    normalised = torch.nn.functional.normalize(torch.from_numpy(raw), dim=-1).numpy()
    session = ort_session(manifest_path.parent / "head.onnx")
    return session.run(None, {"image_features": normalised})[0]


def test_head_backend_logits_equal_the_python_head_on_demo_features(head_build, demo, demo_features, tmp_path):
    binary = head_build
    manifest_path, _, _ = demo
    features_path, raw, pixels = demo_features
    out = tmp_path / "logits.npy"
    result = run(binary, "--manifest", manifest_path, "--features", features_path, "--logits-out", out, "--topk", 3)
    cpp = np.load(out)
    reference = python_head(manifest_path, raw)
    assert cpp.shape == reference.shape == (16, len(json.loads(manifest_path.read_text())["class_names"]))
    diff = float(np.abs(cpp - reference).max())
    kernel = run(binary, "--head-kernel").stdout.strip()
    print(f"head parity ({binary.name}, {kernel} kernel): max abs diff {diff:.3e} over {cpp.size} logits "
          f"(|logit| max {np.abs(reference).max():.1f})")
    assert diff <= HEAD_FEATURES_ATOL
    # The full pixels -> logits graph agrees with the head on the same backbone's features.
    assert np.abs(cpp - ort_session(manifest_path.parent / "model.onnx").run(None, {"pixel_values": pixels})[0]).max() <= HEAD_ATOL
    # Normalised and raw features give the same logits: the head normalises its input.
    normalised = tmp_path / "normalised.npy"
    np.save(normalised, (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float64))  # float64 is read too
    run(binary, "--manifest", manifest_path, "--features", normalised, "--logits-out", tmp_path / "n.npy", "--quiet")
    assert np.abs(np.load(tmp_path / "n.npy") - cpp).max() <= HEAD_ATOL
    # The printed ranking is the logits' ranking, with the manifest's class names.
    names = json.loads(manifest_path.read_text())["class_names"]
    blocks = result.stdout.strip().split("# ")[1:]
    assert len(blocks) == 16
    for row, block in enumerate(blocks):
        lines = block.strip().splitlines()[1:]
        assert [line.split("\t")[0] for line in lines] == ["1", "2", "3"]
        assert [line.split("\t")[1] for line in lines] == [names[i] for i in np.argsort(-cpp[row], kind="stable")[:3]]
        assert abs(float(lines[0].split("\t")[2]) - cpp[row].max()) <= 1e-4 * max(1.0, abs(cpp[row].max()))


def write_test_images(root: Path) -> dict[str, Path]:
    """Real image files of every kind the runtime reads: sizes up and down, modes, PNG and JPEG."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)

    def smooth(height: int, width: int, channels: int) -> np.ndarray:
        # gradients plus noise plus a few hard edges: exercises every filter tap
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * 255 // max(width - 1, 1) + 37 * c) % 256 for c in range(channels)], axis=-1)
        noisy = base + rng.integers(-40, 40, size=(height, width, channels))
        noisy[height // 3: height // 2, width // 4: width // 2] = 255
        return np.clip(noisy, 0, 255).astype(np.uint8)

    files = {}

    def save(name: str, image: Image.Image, **options) -> None:
        files[name] = root / name
        image.save(files[name], **options)

    save("demo-48.png", Image.fromarray(smooth(48, 48, 3)))
    save("rgb-300x200-down.png", Image.fromarray(smooth(200, 300, 3)))
    save("rgb-17x31-up.png", Image.fromarray(smooth(31, 17, 3)))
    save("rgb-640x480.png", Image.fromarray(smooth(480, 640, 3)))
    save("rgb-1x1.png", Image.fromarray(smooth(1, 1, 3)))
    save("rgba-120x90.png", Image.fromarray(smooth(90, 120, 4)))
    grey_alpha = smooth(100, 64, 2)
    save("la-64x100.png", Image.merge("LA", [Image.fromarray(grey_alpha[..., i]) for i in range(2)]))
    save("grey-70x50.png", Image.fromarray(smooth(50, 70, 1)[..., 0], "L"))
    save("bilevel-40x40.png", Image.fromarray(smooth(40, 40, 1)[..., 0] > 128).convert("1"))
    palette = Image.fromarray(smooth(60, 80, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    save("palette-80x60.png", palette, transparency=3)
    wide = (smooth(45, 77, 1)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 256, size=(45, 77))).astype(np.uint16)
    save("grey16-77x45.png", Image.fromarray(wide))  # mode I;16
    save("jpeg-420-250x170.jpg", Image.fromarray(smooth(170, 250, 3)), quality=90)
    save("jpeg-444-64x64.jpg", Image.fromarray(smooth(64, 64, 3)), quality=95, subsampling=0)
    save("jpeg-progressive-101x73.jpg", Image.fromarray(smooth(73, 101, 3)), quality=85, progressive=True)
    save("jpeg-grey-90x120.jpg", Image.fromarray(smooth(120, 90, 1)[..., 0], "L"), quality=90)
    return files


# image_size, resize_mode, interpolation; the demo's own (48, shortest, bicubic) comes from its manifest
CONFIGS = {
    "demo": None,
    "224-shortest-bicubic": ([224, 224], "shortest", "bicubic"),
    "160x224-shortest": ([160, 224], "shortest", "bicubic"),
    "224-longest-bilinear": ([224, 224], "longest", "bilinear"),
    "96x64-squash-bicubic": ([96, 64], "squash", "bicubic"),
}


def configured_manifest(manifest_path: Path, config: str, directory: Path) -> Path:
    """A copy of the demo manifest with the preprocessing of CONFIGS[config], written into `directory`."""
    manifest = json.loads(manifest_path.read_text())
    if CONFIGS[config] is not None:
        size, mode, interpolation = CONFIGS[config]
        manifest["preprocess"].update(image_size=size, resize_mode=mode, interpolation=interpolation,
                                      crop={"shortest": "center", "longest": "pad-center", "squash": "none"}[mode])
    path = directory / f"manifest-{config}.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("config", list(CONFIGS))
def test_preprocessing_equals_open_clip_on_png_and_jpeg(checked_build, config, demo, tmp_path):
    import open_clip

    manifest_path, model, _ = demo
    path = configured_manifest(manifest_path, config, tmp_path)
    manifest = json.loads(path.read_text())
    if CONFIGS[config] is None:
        reference = model.preprocess
    else:
        size, mode, interpolation = CONFIGS[config]
        reference = open_clip.image_transform(tuple(size), is_train=False, mean=manifest["preprocess"]["mean"],
                                              std=manifest["preprocess"]["std"], resize_mode=mode,
                                              interpolation=interpolation)
    files = write_test_images(tmp_path / "images")
    out = tmp_path / "pixels.npy"
    run(checked_build, "--manifest", path, "--image", *files.values(), "--pixels-out", out, "--preprocess-only")
    cpp = np.load(out)
    python = np.stack([reference(decode_image(file)[0]).numpy() for file in files.values()])
    assert cpp.shape == python.shape
    worst = {name: float(np.abs(cpp[i] - python[i]).max()) for i, name in enumerate(files)}
    print(f"preprocessing {config} ({checked_build.name}): " + ", ".join(f"{name} {diff:.1e}" for name, diff in worst.items()))
    assert max(worst.values()) == 0.0, worst  # bit for bit, on every build (cpp/README.md, Preprocessing)


def test_onnxruntime_backend_matches_python_onnxruntime_on_demo_images(pixels_build, demo, tmp_path):
    infer = pixels_build
    needs_onnxruntime(infer)
    manifest_path, model, images = demo
    run(infer, "--manifest", manifest_path, "--image", *images, "--backend", "onnxruntime",
        "--logits-out", tmp_path / "logits.npy", "--pixels-out", tmp_path / "pixels.npy", "--quiet")
    pixels = torch.stack([model.preprocess(decode_image(path)[0]) for path in images]).numpy()
    assert np.abs(np.load(tmp_path / "pixels.npy") - pixels).max() <= PIXEL_ATOL
    reference = ort_session(manifest_path.parent / "model.onnx").run(None, {"pixel_values": pixels})[0]
    diff = float(np.abs(np.load(tmp_path / "logits.npy") - reference).max())
    print(f"onnxruntime backend parity ({infer.name}): max abs diff {diff:.3e}")
    assert diff <= HEAD_ATOL
    # default backend for images is onnxruntime; top-1 equals Python's argmax
    printed = run(infer, "--manifest", manifest_path, "--image", images[0], "--topk", 1).stdout.splitlines()
    names = json.loads(manifest_path.read_text())["class_names"]
    assert printed[1].split("\t")[:2] == ["1", names[int(reference[0].argmax())]]


def test_transmiter_predict_answers_as_transmiter_infer(infer, demo, tmp_path, capsys):
    from transmiter_deploy.cli import main

    needs_onnxruntime(infer)
    manifest_path, _, images = demo
    printed = run(infer, "--manifest", manifest_path, "--image", *images, "--topk", 3).stdout.splitlines()
    cpp, current = {}, None
    for line in printed:
        if line.startswith("# "):
            current = cpp.setdefault(line[2:], [])
        else:
            rank, name, score = line.split("\t")
            current.append((name, float(score)))
    out = tmp_path / "predict.jsonl"
    assert main(["--quiet", "predict", str(manifest_path.parent), *map(str, images), "--topk", "3",
                 "--json", str(out)]) == 0
    python = {record["image"]: [(top["class"], top["score"]) for top in record["top"]]
              for record in map(json.loads, out.read_text().splitlines())}
    assert python.keys() == cpp.keys() and len(python) == len(images)
    for image, top in python.items():
        assert [name for name, _ in top] == [name for name, _ in cpp[image]], image
        # the C++ CLI prints 6 significant digits
        assert all(abs(a - b) <= HEAD_ATOL + 1e-5 * abs(b) for (_, a), (_, b) in zip(top, cpp[image])), image


def test_onnxruntime_backend_runs_the_int8_graph_as_python_does(pixels_build, demo, demo_int8_export, tmp_path):
    infer = pixels_build
    needs_onnxruntime(infer)
    _, model, images = demo
    out, _ = demo_int8_export
    manifest_path = out / "onnx" / "manifest.json"
    run(infer, "--manifest", manifest_path, "--image", *images, "--graph", "model_int8.onnx",
        "--logits-out", tmp_path / "logits.npy", "--quiet")
    pixels = torch.stack([model.preprocess(decode_image(path)[0]) for path in images]).numpy()
    reference = ort_session(manifest_path.parent / "model_int8.onnx").run(None, {"pixel_values": pixels})[0]
    diff = float(np.abs(np.load(tmp_path / "logits.npy") - reference).max())
    fp32 = ort_session(manifest_path.parent / "model.onnx").run(None, {"pixel_values": pixels})[0]
    quantisation = float(np.abs(fp32 - reference).max())
    print(f"onnxruntime backend int8 parity ({infer.name}): max abs diff {diff:.3e} (int8 vs fp32: {quantisation:.3e})")
    assert quantisation > 10 * HEAD_ATOL  # really the int8 graph, not model.onnx
    if infer.arch == "x86_64":
        assert diff <= HEAD_ATOL
    else:
        # ONNX Runtime's int8 GEMM and requantisation kernels (MLAS) are written per architecture,
        # and per x86 generation: judged as the int8 precision is judged (registry: top-1 against
        # the reference), and as close to an fp32 result as x86's int8 is, measured either against
        # x86's int8 logits (where the kernels round alike: AVX-512 VNNI) or against the fp32
        # logits both approximate (where x86's AVX2 path, without VNNI, errs on its own side:
        # aarch64 0.24 from fp32, x86 0.31, 0.37 apart, on the small demo's int8 graph)
        emulated = np.load(tmp_path / "logits.npy")
        assert diff <= quantisation or float(np.abs(emulated - fp32).max()) <= quantisation, diff
        assert (emulated.argmax(1) == reference.argmax(1)).all()
    missing = run(infer, "--manifest", manifest_path, "--image", images[0], "--graph", "model_int4.onnx", check=False)
    assert missing.returncode == 2 and "lists no ONNX graph 'model_int4.onnx'" in missing.stderr


def test_onnxruntime_backend_loads_the_fp16_graph_with_default_options(pixels_build, demo, tmp_path):
    """The C++ backend no longer turns ONNX Runtime's optimiser off for fp16: the graph itself is
    made loadable (deploy/consumer_safety.py), and it computes what Python's default session does."""
    infer = pixels_build
    needs_onnxruntime(infer)
    manifest_path, model, images = demo
    run(infer, "--manifest", manifest_path, "--image", *images, "--graph", "model_fp16.onnx",
        "--logits-out", tmp_path / "logits.npy", "--quiet")
    pixels = torch.stack([model.preprocess(decode_image(path)[0]) for path in images]).numpy()
    reference = ort_session(manifest_path.parent / "model_fp16.onnx").run(None, {"pixel_values": pixels})[0]
    cpp = np.load(tmp_path / "logits.npy")
    print(f"onnxruntime backend fp16 parity ({infer.name}): max abs diff {float(np.abs(cpp - reference).max()):.3e}")
    assert np.abs(cpp - reference).max() <= fp16_atol(infer, reference)
    assert (cpp.argmax(1) == reference.argmax(1)).all()


@pytest.fixture
def broken(demo, demo_features, tmp_path):
    """A writable copy of the demo export's manifest and head, and helpers to break them."""
    manifest_path, _, images = demo
    copy = tmp_path / "export"
    copy.mkdir()
    for name in ("manifest.json", "head.safetensors"):
        shutil.copy(manifest_path.parent / name, copy / name)
    return copy, demo_features[0], images


def test_cli_refuses_bad_input_with_one_line_and_the_toolkit_exit_statuses(refusing_build, broken, tmp_path):
    binary = refusing_build
    export, features, images = broken
    manifest = export / "manifest.json"
    payload = json.loads(manifest.read_text())
    d = payload["feature_dim"]

    def refused(*args, status: int = 2, match: str = "") -> str:
        result = run(binary, *args, check=False)
        assert result.returncode == status, (args, result.returncode, result.stderr)
        line = result.stderr.strip()
        assert line.count("\n") == 0 and line.startswith("transmiter_infer: error: "), result.stderr
        assert match in line, line
        assert result.stdout == ""
        return line

    def write(name: str, data) -> Path:
        path = tmp_path / name
        np.save(path, data) if isinstance(data, np.ndarray) else path.write_bytes(data)
        return path

    refused("--manifest", tmp_path / "missing.json", "--features", features, match="not found")
    refused("--manifest", write("garbage.json", b"{not json"), "--features", features, match="not valid JSON")
    refused("--manifest", manifest, "--features", tmp_path / "missing.npy", match="not found")
    refused("--manifest", manifest, "--features", write("wide.npy", np.zeros((2, d + 1), np.float32)),
            match=f"(batch, {d})")
    refused("--manifest", manifest, "--features", write("ints.npy", np.zeros((2, d), np.int32)), match="float32 or float64")
    refused("--manifest", manifest, "--features", write("short.npy", b"\x93NUMPY\x01\x00"),
            match="not a .npy file")
    nan = np.ones((2, d), np.float32)
    nan[1, 3] = np.nan
    refused("--manifest", manifest, "--features", write("nan.npy", nan), match="NaN")
    zero = np.ones((2, d), np.float32)
    zero[1] = 0.0
    refused("--manifest", manifest, "--features", write("zero.npy", zero), match="row 1 has zero norm")
    refused("--manifest", manifest, "--features", features, "--frobnicate", match="unknown option")
    refused("--manifest", manifest, match="either --image")
    refused("--manifest", manifest, "--features", features, "--topk", "0", match="--topk")
    refused("--manifest", manifest, "--image", tmp_path / "missing.png", "--preprocess-only", "--pixels-out",
            tmp_path / "p.npy", match="not found")
    png = images[0].read_bytes()
    for name, data in {"empty.png": b"", "text.png": b"hello", "truncated.png": png[: len(png) // 2],
                       "corrupt.png": png[:40] + bytes(60) + png[100:]}.items():
        refused("--manifest", manifest, "--image", write(name, data), "--preprocess-only", "--pixels-out",
                tmp_path / "p.npy", match="image")
    jpeg = tmp_path / "ok.jpg"
    Image.open(images[0]).convert("RGB").save(jpeg, quality=90)
    refused("--manifest", manifest, "--image", write("truncated.jpg", jpeg.read_bytes()[:300]), "--preprocess-only",
            "--pixels-out", tmp_path / "p.npy", match="cannot decode image")
    refused("--manifest", manifest, "--features", features, "--backend", "tensorrt", status=3, match="tensorrt")
    # The head file is checked against the manifest before it is parsed.
    head = (export / "head.safetensors").read_bytes()
    (export / "head.safetensors").write_bytes(head[:-8])
    refused("--manifest", manifest, "--features", features, match="truncated or modified")
    (export / "head.safetensors").write_bytes(head[:100] + bytes([head[100] ^ 1]) + head[101:])
    refused("--manifest", manifest, "--features", features, match="sha256")
    (export / "head.safetensors").write_bytes(head)
    # A manifest that does not match its head: feature width, class count.
    for change, match in ((dict(feature_dim=d + 1), "feature_dim"),
                          (dict(class_names=payload["class_names"][:-1]), "task classes")):
        manifest.write_text(json.dumps({**payload, **change}))
        refused("--manifest", manifest, "--features", features, match=match)
    manifest.write_text(json.dumps({**payload, "format_version": 99}))
    refused("--manifest", manifest, "--features", features, match="newer")
    manifest.write_text(json.dumps(payload))
    run(binary, "--manifest", manifest, "--features", features, "--quiet")  # restored: works again


def test_format_fuzz_on_synthetic_and_demo_files_is_clean(refusing_build, demo):
    manifest_path, _, _ = demo
    trace = {"TRANSMITER_CASES_TRACE": "1"}
    result = run(refusing_build, manifest_path, program="fuzz_formats", env=trace)
    summary = result.stdout.strip().splitlines()[-1]
    print(summary)
    assert "0 failures" in summary
    if refusing_build.emulated:
        # Every case decided alike on both architectures: the same verdict and the same message.
        native = run(cpp_build("release"), manifest_path, program="fuzz_formats", env=trace).stdout.splitlines()
        ours = result.stdout.splitlines()
        assert len(ours) == len(native) > 20000
        first = next((i for i, (a, b) in enumerate(zip(ours, native)) if a != b), None)
        assert first is None, f"case {first}: {refusing_build.name}: {ours[first]!r}, native: {native[first]!r}"


@pytest.mark.parametrize("sigma_mode,layers,softmax", [("gram", 2, False), ("norm", 1, True), ("gram", 1, True)])
def test_head_backend_covers_gram_sigma_several_blocks_and_softmax(checked_build, sigma_mode, layers, softmax, tmp_path):
    """Head variants the demo export does not produce: the Gram form of sigma, two blocks, probabilities."""
    from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
    from transmiter_deploy.features.adapter_artifact import AdapterArtifact
    from transmiter_deploy.artifacts import sha256_file
    from transmiter_deploy.deploy.fusion import FoldedHead
    from transmiter_deploy.deploy.head_weights import write_head_safetensors

    from conftest import make_head_and_adapter

    d, width, k = 24, 40, 5
    latent = width if sigma_mode == "norm" else 32  # the norm shortcut needs a square basis
    head, artifact = make_head_and_adapter(d, width, k, latent_dim=latent, seed=3)
    config = AdapterConfig(num_task_classes=k, logit_width=width, latent_dim=latent, num_layers=layers)
    adapter = TransMiterAdapter(config, seed=3)
    with torch.no_grad():
        adapter.basis.copy_(artifact.adapter.basis)
        for parameter in adapter.blocks.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)))
    artifact = AdapterArtifact(adapter, artifact.class_names, artifact.auxiliary_names, "transferred",
                               artifact.source_model, artifact.target_model)
    folded = FoldedHead(head, artifact, sigma_mode)
    assert folded.sigma_mode == sigma_mode
    export = tmp_path / "export"
    export.mkdir()
    write_head_safetensors(folded, export / "head.safetensors")
    manifest = {"format": "transmiter-deploy/onnx-export", "format_version": 1,
                "files": {"head.safetensors": {"sha256": sha256_file(export / "head.safetensors"),
                                               "bytes": (export / "head.safetensors").stat().st_size}},
                "output": "probabilities" if softmax else "logits", "class_names": artifact.class_names,
                "preprocess": {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
                               "resize_mode": "shortest"},
                "feature_dim": d}
    (export / "manifest.json").write_text(json.dumps(manifest))
    raw = torch.randn(6, d, generator=torch.Generator().manual_seed(5)) * 4
    np.save(tmp_path / "f.npy", raw.numpy())
    run(checked_build, "--manifest", export / "manifest.json", "--features", tmp_path / "f.npy",
        "--logits-out", tmp_path / "out.npy", "--quiet")
    with torch.no_grad():
        expected = folded(torch.nn.functional.normalize(raw, dim=-1))
        expected = (expected.softmax(dim=-1) if softmax else expected).numpy()
    got = np.load(tmp_path / "out.npy")
    # probabilities move by at most half the logits' error (|d softmax| <= 1/2 per unit of logit)
    assert np.abs(got - expected).max() <= (1e-5 if softmax else HEAD_ATOL)
    if softmax:
        assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_installed_package_links_into_an_application_as_the_readme_says(infer, demo, tmp_path):
    """`cmake --install` + `find_package(transmiter)` + `transmiter::transmiter`, as in cpp/README.md."""
    manifest_path, _, _ = demo
    prefix, app = tmp_path / "prefix", tmp_path / "app"
    subprocess.run(["cmake", "--install", str(infer.directory), "--prefix", str(prefix)], check=True, capture_output=True)
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.20)\nproject(app CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        "find_package(transmiter 0.1 REQUIRED)\nadd_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE transmiter::transmiter)\n")
    (app / "main.cpp").write_text(r"""
#include <transmiter/transmiter.hpp>
#include <cstdio>
int main(int argc, char** argv) {
  try {
    auto head = transmiter::load_classifier(argv[1], transmiter::Backend::Head);
    transmiter::Tensor features({1, head->manifest().feature_dim});
    for (std::size_t i = 0; i < features.data.size(); ++i) features.data[i] = 0.01f * float(i % 7);
    transmiter::Tensor logits = head->classify(features);
    std::printf("%s\n", head->top_k(logits, 1)[0][0].class_name.c_str());
  } catch (const transmiter::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return e.exit_status();
  }
}
""")
    for command in (["cmake", "-S", str(app), "-B", str(app / "build"), f"-DCMAKE_PREFIX_PATH={prefix}"],
                    ["cmake", "--build", str(app / "build")]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    printed = subprocess.run([str(app / "build" / "app"), str(manifest_path)], capture_output=True, text=True, check=True)
    features = (0.01 * (np.arange(json.loads(manifest_path.read_text())["feature_dim"]) % 7)).astype(np.float32)[None]
    np.save(tmp_path / "f.npy", features)
    expected = run(infer, "--manifest", manifest_path, "--features", tmp_path / "f.npy", "--topk", 1).stdout.splitlines()[1]
    assert printed.stdout.strip() == expected.split("\t")[1]



def configured_onnxruntime_library(build: CppBuild) -> Path:
    """The ONNX Runtime library a build loads by default (CMake's ONNXRUNTIME_LIBRARY)."""
    for line in (build.directory / "CMakeCache.txt").read_text().splitlines():
        if line.startswith("ONNXRUNTIME_LIBRARY:"):
            return Path(line.split("=", 1)[1])
    pytest.fail(f"{build.directory}/CMakeCache.txt has no ONNXRUNTIME_LIBRARY")


def test_aarch64_build_gives_the_x86_builds_logits_and_pixels(infer, infer_aarch64, demo, demo_features, tmp_path):
    """Across architectures and head kernels (avx2/sse2/neon and the scalar fallback): the same
    summation order and no contracted multiply-adds (cpp/CMakeLists.txt), so the same numbers."""
    manifest_path, _, images = demo
    features_path, _, _ = demo_features
    logits = {}
    for build in (infer, infer_aarch64):
        for kernel in ("auto", "scalar"):
            chosen = run(build, "--head-kernel", env={"TRANSMITER_HEAD_KERNEL": kernel}).stdout.strip()
            out = tmp_path / f"{build.name}-{chosen}.npy"
            run(build, "--manifest", manifest_path, "--features", features_path, "--logits-out", out, "--quiet",
                env={"TRANSMITER_HEAD_KERNEL": kernel})
            logits[f"{build.name}-{chosen}"] = np.load(out)
    assert {"aarch64-neon", "aarch64-scalar", "release-scalar"} <= set(logits), list(logits)
    reference = logits["release-scalar"]
    for name, values in logits.items():
        print(f"head logits {name} vs release-scalar: max abs diff {float(np.abs(values - reference).max()):.3e}")
        assert np.array_equal(values, reference), name
    # Pixels: bit-identical on every preprocessing configuration and image kind.
    files = write_test_images(tmp_path / "images")
    for config in CONFIGS:
        path = configured_manifest(manifest_path, config, tmp_path)
        pixels = []
        for build in (infer, infer_aarch64):
            out = tmp_path / f"{config}-{build.name}-pixels.npy"
            run(build, "--manifest", path, "--image", *files.values(), "--pixels-out", out, "--preprocess-only")
            pixels.append(np.load(out))
        assert np.array_equal(pixels[0], pixels[1]), config


def test_an_onnxruntime_library_of_the_other_architecture_is_refused_in_one_line(infer, infer_aarch64, demo):
    needs_onnxruntime(infer)
    needs_onnxruntime(infer_aarch64)
    manifest_path, _, images = demo
    for build, other in ((infer_aarch64, infer), (infer, infer_aarch64)):
        library = configured_onnxruntime_library(other)
        result = run(build, "--manifest", manifest_path, "--image", images[0], "--onnxruntime-library", library,
                     check=False)
        line = result.stderr.strip()
        assert result.returncode == 3 and line.count("\n") == 0, (build.name, result.returncode, result.stderr)
        theirs = "aarch64" if other.arch == "aarch64" else "x86-64"
        ours = "aarch64" if build.arch == "aarch64" else "x86-64"
        assert f"{library} is built for {theirs}, this program for {ours}" in line, line
        assert result.stdout == ""
