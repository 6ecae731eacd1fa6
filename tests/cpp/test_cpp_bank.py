"""The C++ runtime (cpp/) on a task bank (docs/bank.md) against Python ONNX Runtime: every task's
top-k from one CLI call, the head backend per task on features, the onnxruntime backend per task
(the backbone once, then each task's head; or the fused graph), and the CLI's one-line errors.

As in test_cpp_runtime.py: `make test` (or `make cpp-test`) builds cpp/ (cpp_builds.py names
the builds and their variables), natively and for aarch64 under emulation; without them these
tests skip, and a missing onnxruntime backend skips (or, with TRANSMITER_CPP_ORT=ON, fails) the
pixels tests. The single-task export is covered there and not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_tree
from cpp_builds import CppBuild, build_case, builds, infer, infer_asan, needs_onnxruntime, run  # noqa: F401 (fixtures)
from test_cpp_runtime import HEAD_ATOL, PIXEL_ATOL, fp16_atol
from transmiter_deploy.features.datasets import decode_image
from transmiter_deploy.runtimes.onnxruntime import ort_session

FEATURES_ATOL = 1e-5  # the C++ head against head.onnx, both on the same features


# The builds come first in each test's arguments so that a missing build skips before the bank is exported.
head_build = builds("release", "asan", "aarch64")
pixels_build = builds("release", "aarch64")


@pytest.fixture(scope="module")
def bank(demo_bank_export):
    """The bank's manifest path, its manifest, and 4 test images of each task."""
    manifest_path = demo_bank_export / "onnx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    images = []
    for task in manifest["tasks"]:
        found = sorted((demo_bank_export / "tasks" / task["name"] / "data" / "test").glob("*/*.png"))
        assert len(found) >= 4, task["name"]
        images += found[:4]
    return manifest_path, manifest, images


@pytest.fixture(scope="module")
def bank_pixels(bank):
    """The images preprocessed in Python (open_clip's eval transform, from the manifest)."""
    import open_clip

    _, manifest, images = bank
    pre = manifest["preprocess"]
    transform = open_clip.image_transform(tuple(pre["image_size"]), is_train=False, mean=pre["mean"], std=pre["std"],
                                          resize_mode=pre["resize_mode"], interpolation=pre["interpolation"])
    return np.stack([transform(decode_image(path)[0]).numpy() for path in images])


def python_outputs(graph: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of a pixels graph of the bank under Python ONNX Runtime, by name."""
    session = ort_session(graph)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": pixels})))


def task_names(manifest: dict) -> list[str]:
    return [task["name"] for task in manifest["tasks"]]


def task_output(logits_out: Path, task: str) -> np.ndarray:
    """A task's outputs as --logits-out writes them for a bank (one .npy per task)."""
    return np.load(logits_out / f"{task}.npy")


def read_printout(stdout: str) -> list[dict[str, list[list[str]]]]:
    """The CLI's bank printout: per input, {task: [[rank, class, score], ...]} in printed order."""
    inputs = []
    for block in stdout.split("# ")[1:]:
        tasks: dict[str, list[list[str]]] = {}
        for line in block.splitlines()[1:]:
            if line.startswith("task "):
                tasks[line[len("task "):]] = []
            else:
                tasks[list(tasks)[-1]].append(line.split("\t"))
        inputs.append(tasks)
    return inputs


def refused(binary: CppBuild, *args, status: int = 2) -> str:
    """The CLI's one-line error (nothing on stdout) with `status`; returns the line."""
    result = run(binary, *args, check=False)
    assert result.returncode == status, (args, result.returncode, result.stderr)
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("transmiter_infer: error: "), result.stderr
    assert result.stdout == ""
    return line


def test_cli_prints_every_tasks_top_k_and_top1_equals_python_model_onnx(pixels_build, bank, bank_pixels, tmp_path):
    infer = pixels_build
    needs_onnxruntime(infer)
    manifest_path, manifest, images = bank
    result = run(infer, "--manifest", manifest_path, "--image", *images, "--topk", 3,
                 "--pixels-out", tmp_path / "p.npy")
    assert np.abs(np.load(tmp_path / "p.npy") - bank_pixels).max() <= PIXEL_ATOL
    reference = python_outputs(manifest_path.parent / "model.onnx", bank_pixels)
    printed = read_printout(result.stdout)
    assert len(printed) == len(images)
    for row, tasks in enumerate(printed):
        assert list(tasks) == task_names(manifest)  # every task, labelled, in manifest order
        for task in manifest["tasks"]:
            lines = tasks[task["name"]]
            assert [line[0] for line in lines] == ["1", "2", "3"]
            logits = reference[task["output"]][row]
            assert lines[0][1] == task["class_names"][int(logits.argmax())], (images[row], task["name"])
            assert abs(float(lines[0][2]) - logits.max()) <= HEAD_ATOL + 1e-5 * abs(logits.max())  # 6 digits printed


def test_head_backend_gives_each_tasks_head_onnx_logits_on_features(head_build, bank, bank_pixels, tmp_path):
    binary = head_build
    manifest_path, manifest, _ = bank
    # The features every head of the bank reads: backbone.onnx's (L2-normalised) output.
    features = ort_session(manifest_path.parent / "backbone.onnx").run(None, {"pixel_values": bank_pixels})[0]
    np.save(tmp_path / "features.npy", features)
    run(binary, "--manifest", manifest_path, "--features", tmp_path / "features.npy", "--logits-out", tmp_path / "out",
        "--quiet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{t}.npy" for t in task_names(manifest))
    for task in manifest["tasks"]:
        cpp = task_output(tmp_path / "out", task["name"])
        head_onnx = ort_session(manifest_path.parent / task["head"]["graphs"]["fp32"])
        python = head_onnx.run(None, {"image_features": features})[0]
        assert cpp.shape == python.shape == (len(features), len(task["class_names"]))
        diff = float(np.abs(cpp - python).max())
        print(f"bank head parity ({binary.name}) {task['name']}: max abs diff {diff:.3e} "
              f"(|logit| max {np.abs(python).max():.1f})")
        assert diff <= FEATURES_ATOL
    # Raw features (an application's own encoder, unnormalised) give the same logits: the head normalises.
    scaled = features * np.linspace(0.5, 20, len(features), dtype=np.float32)[:, None]
    np.save(tmp_path / "scaled.npy", scaled)
    run(binary, "--manifest", manifest_path, "--features", tmp_path / "scaled.npy", "--logits-out", tmp_path / "scaled",
        "--quiet")
    for name in task_names(manifest):
        assert np.abs(task_output(tmp_path / "scaled", name) - task_output(tmp_path / "out", name)).max() <= HEAD_ATOL


# Every graph natively; on aarch64 the default path (the C++ heads after ONNX Runtime's backbone):
# the fused graphs are ONNX Runtime's alone, checked on aarch64 by test_cpp_runtime.py's export graphs.
BANK_GRAPHS = [("release", "default"), ("release", "model.onnx"), ("release", "model_fp16.onnx"), ("aarch64", "default")]


@pytest.mark.parametrize("build_case", BANK_GRAPHS, indirect=True, ids=["-".join(case) for case in BANK_GRAPHS])
def test_onnxruntime_backend_gives_each_tasks_model_onnx_outputs(build_case, bank, bank_pixels, tmp_path):
    """Default: backbone.onnx once, then every task's head in C++; or a fused graph run as Python runs it."""
    infer, graph = build_case
    needs_onnxruntime(infer)
    manifest_path, manifest, images = bank
    chosen = () if graph == "default" else ("--graph", graph)
    run(infer, "--manifest", manifest_path, "--image", *images, *chosen, "--logits-out", tmp_path / "out", "--quiet")
    fused = "model.onnx" if graph == "default" else graph
    reference = python_outputs(manifest_path.parent / fused, bank_pixels)
    for task in manifest["tasks"]:
        cpp = task_output(tmp_path / "out", task["name"])
        diff = float(np.abs(cpp - reference[task["output"]]).max())
        print(f"bank onnxruntime parity ({infer.name}, {graph}) {task['name']}: max abs diff {diff:.3e}")
        assert cpp.shape == (len(images), len(task["class_names"]))
        assert diff <= (fp16_atol(infer, reference[task["output"]]) if "fp16" in graph else HEAD_ATOL)
        assert (cpp.argmax(1) == reference[task["output"]].argmax(1)).all()
    # --task runs only the tasks named, with the same outputs.
    last = task_names(manifest)[-1]
    lines = run(infer, "--manifest", manifest_path, "--image", images[0], *chosen, "--task", last, "--topk", 1,
                "--logits-out", tmp_path / "one").stdout.splitlines()
    assert len(lines) == 3 and lines[:2] == [f"# {images[0]}", f"task {last}"] and lines[2].startswith("1\t")
    assert [p.name for p in (tmp_path / "one").iterdir()] == [f"{last}.npy"]
    assert np.abs(task_output(tmp_path / "one", last)[0] - task_output(tmp_path / "out", last)[0]).max() <= HEAD_ATOL


def test_cli_refuses_an_unknown_task_and_a_tampered_head_in_one_line(infer, infer_asan, bank, bank_pixels, tmp_path):
    manifest_path, manifest, images = bank
    names = task_names(manifest)
    features = ort_session(manifest_path.parent / "backbone.onnx").run(None, {"pixel_values": bank_pixels[:2]})[0]
    np.save(tmp_path / "features.npy", features)
    line = refused(infer_asan, "--manifest", manifest_path, "--features", tmp_path / "features.npy",
                   "--task", "no_such_task")
    assert "unknown task 'no_such_task'" in line and all(name in line for name in names), line
    # A copy of the bank with one head modified: refused before use, naming the file.
    copy = copy_tree(manifest_path.parent, tmp_path / "bank")
    tampered = manifest["tasks"][-1]["head"]["safetensors"]
    head = (copy / tampered).read_bytes()
    (copy / tampered).write_bytes(head[:200] + bytes([head[200] ^ 1]) + head[201:])
    line = refused(infer_asan, "--manifest", copy / "manifest.json", "--features", tmp_path / "features.npy")
    assert str(copy / tampered) in line and "sha256" in line, line
    if "onnxruntime" in run(infer, "--backends").stdout.split():
        line = refused(infer, "--manifest", copy / "manifest.json", "--image", images[0])  # reads the heads too
        assert str(copy / tampered) in line and "sha256" in line, line
        head_graph = manifest["tasks"][0]["head"]["graphs"]["fp32"]  # features in: not a pixels graph
        assert "neither a backbone graph nor a fused graph" in refused(infer, "--manifest", manifest_path, "--image",
                                                                       images[0], "--graph", head_graph)
    # Only the tasks run are read: the others still work from the same copy.
    others = [arg for name in names[:-1] for arg in ("--task", name)]
    run(infer_asan, "--manifest", copy / "manifest.json", "--features", tmp_path / "features.npy", *others, "--quiet")
    # A manifest that does not match a task's head: feature width, class count (named by the head's file).
    (copy / tampered).write_bytes(head)
    first = manifest["tasks"][0]
    for change, match in ((lambda m: m.update(feature_dim=m["feature_dim"] + 1), "feature_dim"),
                          (lambda m: m["tasks"][0].update(class_names=first["class_names"][:-1]), "task classes")):
        edited = json.loads(manifest_path.read_text())
        change(edited)
        (copy / "manifest.json").write_text(json.dumps(edited))
        line = refused(infer_asan, "--manifest", copy / "manifest.json", "--features", tmp_path / "features.npy")
        assert match in line and str(copy / first["head"]["safetensors"]) in line, line
