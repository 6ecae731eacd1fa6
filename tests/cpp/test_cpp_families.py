"""The C++ runtime on the family matrix (tests/test_families.py): each family's exported graphs
(fp32, fp16, int8) run by the ONNX Runtime backend as Python's ONNX Runtime runs them, and each
target's ``head.safetensors`` (SigLIP's carries its logit bias) computed by the head backend as
the file's Python reading computes it. On the native release build: the graphs are the families'
own, not the runtime's, which the demo's tests cover on every build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAMILY_PAIRS, family_pair_id
from cpp_builds import infer, needs_onnxruntime, run  # noqa: F401 (fixtures)
from transmiter_deploy.deploy.head_weights import head_logits_numpy
from transmiter_deploy.runtimes.onnxruntime import ort_session

ATOL = 1e-4  # logits: the export's own parity bound; the same ONNX Runtime kernels on this CPU


@pytest.mark.parametrize("pair", FAMILY_PAIRS, ids=family_pair_id)
def test_the_cpp_runtime_runs_each_familys_graphs_and_head_as_python_does(infer, pair, family_exports, tmp_path):
    needs_onnxruntime(infer)
    status, out = family_exports(pair)
    assert status == 0
    manifest = out / "onnx" / "manifest.json"
    images = sorted((out / "data" / "test").glob("*/*.png"))[:6]
    for graph in ("model.onnx", "model_fp16.onnx", "model_int8.onnx"):
        logits, pixels = tmp_path / f"{graph}.npy", tmp_path / f"{graph}-pixels.npy"
        run(infer, "--manifest", manifest, "--image", *images, "--graph", graph, "--logits-out", logits,
            "--pixels-out", pixels, "--quiet")
        reference = ort_session(out / "onnx" / graph).run(None, {"pixel_values": np.load(pixels)})[0]
        assert np.abs(np.load(logits) - reference).max() <= ATOL, graph
    features = np.random.default_rng(0).normal(size=(5, json.loads(manifest.read_text())["feature_dim"]))
    np.save(tmp_path / "features.npy", features.astype(np.float32))
    run(infer, "--manifest", manifest, "--features", tmp_path / "features.npy", "--backend", "head",
        "--logits-out", tmp_path / "head.npy", "--quiet")
    reference = head_logits_numpy(out / "onnx" / "head.safetensors", features.astype(np.float32))
    assert np.abs(np.load(tmp_path / "head.npy") - reference).max() <= ATOL
