"""The C++ runtime's onnxruntime backend on an export whose graphs keep their tensors in ONNX
external data (``model.onnx`` + ``model.onnx.data``, forced on the small demo recipe): it reads
and verifies the data files like the graph, hands them to ONNX Runtime from memory, and computes
what Python's ONNX Runtime computes; a missing, truncated, swapped, tampered or renamed data file
is one line with exit status 2, and nothing runs. On the native release build and the aarch64 one
under emulation (cpp_builds.py; ``make test`` names the builds, without them these tests skip)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from transmiter_deploy.features.datasets import decode_image
from transmiter_deploy.runtimes.onnxruntime import ort_session

from conftest import damage_external_data
from cpp_builds import build_case, builds, needs_onnxruntime, run  # noqa: F401 (fixture)
from test_cpp_runtime import HEAD_ATOL, fp16_atol

GRAPHS = ("model.onnx", "model_fp16.onnx")

# First in each test's arguments: a missing build skips before the export is made.
pixels_build = builds("release", "aarch64")


@pytest.fixture(scope="module")
def external(demo_external_export):
    """The external-data demo export's manifest, 8 of its test images and their pixels."""
    from transmiter_deploy.features.models import load_model
    from transmiter_deploy.pipeline.export_run import model_specs

    recipe, outcome = demo_external_export
    manifest_path = outcome.export_dir / "manifest.json"
    files = json.loads(manifest_path.read_text())["files"]
    assert all(files[graph]["external_data"] == [f"{graph}.data"] for graph in GRAPHS)
    images = sorted((outcome.out_dir / "data" / "test").glob("*/*.png"))[:8]
    model = load_model(model_specs(recipe)["target"])
    pixels = torch.stack([model.preprocess(decode_image(path)[0]) for path in images]).numpy()
    return manifest_path, images, pixels


# Both graphs natively; the fp32 one on aarch64 (fp16 on aarch64 is checked on the inline export).
EXTERNAL_GRAPHS = [("release", graph) for graph in GRAPHS] + [("aarch64", "model.onnx")]


@pytest.mark.parametrize("build_case", EXTERNAL_GRAPHS, indirect=True, ids=["-".join(c) for c in EXTERNAL_GRAPHS])
def test_onnxruntime_backend_runs_external_data_graphs_as_python_does(build_case, external, tmp_path):
    infer, graph = build_case
    needs_onnxruntime(infer)
    manifest_path, images, pixels = external
    # from another working directory, on a copy moved elsewhere: the data file is found beside the
    # graph (the manifest's directory), never relative to where the program runs
    moved = shutil.copytree(manifest_path.parent, tmp_path / "moved" / "export")
    for manifest in (manifest_path, moved / "manifest.json"):
        logits = tmp_path / f"{manifest.parent.name}-{graph}.npy"
        run(infer, "--manifest", manifest, "--image", *images, "--backend", "onnxruntime", "--graph", graph,
            "--logits-out", logits, "--quiet")
        reference = ort_session(manifest.parent / graph).run(None, {"pixel_values": pixels})[0]
        cpp = np.load(logits)
        diff = float(np.abs(cpp - reference).max())
        print(f"onnxruntime backend ({infer.name}), external data, {graph}: max abs diff {diff:.3e}")
        assert diff <= (fp16_atol(infer, reference) if "fp16" in graph else HEAD_ATOL)
        assert (cpp.argmax(1) == reference.argmax(1)).all()


# What the one-line error must say, per way of damaging model.onnx's data file.
EXPECTED = {"missing": "model.onnx.data not found", "renamed": "model.onnx.data not found",
            "truncated": "(truncated or modified)", "swapped": "(truncated or modified)",
            "tampered": "does not match the sha256"}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_bad_data_file_is_one_line_and_exit_status_2(pixels_build, external, case, tmp_path):
    infer = pixels_build
    needs_onnxruntime(infer)
    manifest_path, images, _ = external
    bad = shutil.copytree(manifest_path.parent, tmp_path / "bad")
    damage_external_data(bad, case)
    expected = EXPECTED[case]
    logits = tmp_path / "logits.npy"
    result = run(infer, "--manifest", bad / "manifest.json", "--image", images[0], "--backend", "onnxruntime",
                 "--logits-out", logits, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.onnx.data" in lines[0] and expected in lines[0], result.stderr
    assert not logits.exists()


def test_a_manifest_whose_graph_lists_an_unlisted_data_file_is_refused(pixels_build, external, tmp_path):
    infer = pixels_build
    needs_onnxruntime(infer)
    manifest_path, images, _ = external
    bad = shutil.copytree(manifest_path.parent, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]["model.onnx.data"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = run(infer, "--manifest", bad / "manifest.json", "--image", images[0], "--backend", "onnxruntime",
                 check=False)
    assert result.returncode == 2
    assert "names external data 'model.onnx.data', which 'files' does not list" in result.stderr
