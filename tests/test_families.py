"""The family matrix: every open_clip image-tower family, as a tiny random configuration of its own
code path (transmiter_deploy/model_configs/TM-Tiny-*.json, features/tiny_towers.py), exported as
the source of one ``transmiter export`` and the target of the next (conftest.FAMILY_PAIRS) in fp32,
fp16 and int8 with parity against PyTorch; SigLIP's logit bias, the stand-in tokenizer of random
text towers and MobileCLIP's reparameterisation, each checked on its own. The C++ runtime runs
the same exports in tests/cpp/test_cpp_families.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, FAMILY_PAIRS, family_pair_id
from transmiter_deploy.deploy.fusion import FoldedHead, UnfoldedHead
from transmiter_deploy.deploy.graph_cost import count_macs
from transmiter_deploy.deploy.head_weights import head_logits_numpy, write_head_safetensors
from transmiter_deploy.deploy.reparameterise import for_inference
from transmiter_deploy.deploy.trace import to_onnx
from transmiter_deploy.features.models import ModelSpec, StandInTokenizer, load_image_tower, load_model
from transmiter_deploy.method.adapter import TransMiterAdapter, standardise

SIGLIP = ("TM-Tiny-SigLIP", "TM-Tiny-SigLIP2")


@pytest.mark.parametrize("pair", FAMILY_PAIRS, ids=family_pair_id)
def test_each_family_exports_as_source_and_as_target_in_fp32_fp16_and_int8(pair, family_exports):
    status, out = family_exports(pair)
    assert status == 0, (out / "report.md").read_text() if (out / "report.md").exists() else status
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert {"model.onnx", "model_fp16.onnx", "model_int8.onnx", "head.onnx", "head.safetensors"} <= set(manifest["files"])
    assert (manifest["source_model"]["name"], manifest["target_model"]["name"]) == pair
    checks = json.loads((out / "onnx" / "parity.json").read_text())["checks"]
    assert all(check["passed"] for check in checks.values() if check["required"]), checks
    assert checks["onnx_fp32_vs_torch"]["max_abs"] <= 1e-4 and checks["onnx_fp32_vs_torch"]["top1_agreement"] == 1.0
    report = json.loads((out / "report.json").read_text())
    rows = {row["graph"]: row for row in report["validation"]}
    assert rows["model.onnx"]["passed"], rows
    # A random-weight target's logits are near-ties (its text and image features are unrelated),
    # so a reduced precision's top-1 agreement is noise: fp16 is judged by its error against the
    # logits' size (fp16 keeps ~3 significant digits), int8 by finite outputs and its gate's record
    fp16, int8 = rows["model_fp16.onnx"], rows["model_int8.onnx"]
    assert fp16["finite"] and fp16["max_abs_over_max_reference"] <= 1e-2, fp16
    assert int8["finite"] and int8["max_abs"] > fp16["max_abs"], int8  # really quantised
    (gate,) = report["gates"]
    assert gate["passed"] and "random weights" in gate["advisory"]
    # the deployed graph's cost is counted for every family (SigLIP's attention pool needs the
    # symbolic shape inference)
    assert report["parity"]["macs"]["model"]["backbone"] > 0


@pytest.mark.parametrize("pair", [pair for pair in FAMILY_PAIRS if pair[1] in SIGLIP], ids=family_pair_id)
def test_a_siglip_target_carries_its_logit_bias_and_says_its_tokenizer_was_a_stand_in(pair, family_exports):
    status, out = family_exports(pair)
    assert status == 0
    bias = load_model(ModelSpec(pair[1], init_seed=2)).logit_bias
    assert bias == -10.0  # open_clip's init_logit_bias of the SigLIP configurations
    head = json.loads((out / "heads" / "target" / "head.json").read_text())
    assert head["logit_bias"] == bias
    with safe_open(str(out / "onnx" / "head.safetensors"), framework="np") as handle:
        assert float(handle.metadata()["logit_bias"]) == bias
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    report = (out / "report.md").read_text()
    try:
        import transformers  # noqa: F401
    except ImportError:  # the project does not install it: the stand-in is used and recorded
        assert "stand-in tokenizer" in manifest["stand_in_tokenizer"]
        assert "the target head's class names were tokenized by a stand-in tokenizer" in report
        assert "stand-in tokenizer" in head["stand_in_tokenizer"]


def test_logit_bias_shifts_the_adapter_output_by_itself_and_folds_into_the_mean():
    from conftest import make_head_and_adapter

    head, artifact = make_head_and_adapter(24, 40, 6, seed=5)
    logits = torch.randn(16, 40, dtype=torch.float64) * 5
    adapter = artifact.adapter
    # standardisation removes a per-sample constant exactly (float64: to its rounding), and
    # de-standardisation adds it back: the adapter's output moves by the bias and nothing else
    for bias in (-10.0, 3.5):
        assert torch.allclose(standardise(logits + bias, adapter.config.eps)[0], standardise(logits, adapter.config.eps)[0],
                              atol=1e-12)
        with torch.no_grad():
            shifted = adapter.task_logits((logits + bias).float()) - bias
            assert torch.allclose(shifted, adapter.task_logits(logits.float()), atol=1e-4)
    features = torch.nn.functional.normalize(torch.randn(16, 24), dim=-1)
    biased = _with_bias(head, -10.0)
    folded, unfolded = FoldedHead(biased, artifact), UnfoldedHead(biased, artifact)
    plain = FoldedHead(head, artifact)
    with torch.no_grad():
        assert torch.allclose(folded(features), unfolded(features), atol=1e-4)
        assert torch.allclose(folded(features), plain(features) - 10.0, atol=1e-4)
    assert torch.allclose(biased.logits(features), head.logits(features) - 10.0)


def test_head_safetensors_carries_the_bias_and_is_read_with_it(tmp_path):
    from conftest import make_head_and_adapter

    head, artifact = make_head_and_adapter(24, 40, 6, seed=6)
    features = torch.nn.functional.normalize(torch.randn(8, 24), dim=-1)
    for bias in (0.0, -10.0):
        folded = FoldedHead(_with_bias(head, bias), artifact)
        write_head_safetensors(folded, tmp_path / "head.safetensors")
        with safe_open(str(tmp_path / "head.safetensors"), framework="np") as handle:
            assert ("logit_bias" in handle.metadata()) == bool(bias)  # CLIP's heads stay as they were
        with torch.no_grad():
            reference = folded(features).numpy()
        assert np.abs(head_logits_numpy(tmp_path / "head.safetensors", features.numpy()) - reference).max() <= 1e-4


def _with_bias(head, bias: float):
    biased = copy.copy(head)
    biased.logit_bias = bias
    return biased


def test_the_stand_in_tokenizer_is_deterministic_in_range_and_ends_each_text_with_the_largest_id():
    tokenizer = StandInTokenizer(vocab_size=1000, context_length=8)
    ids = tokenizer(["a photo of a red square", "a photo of a red square", "green", " ".join(["w"] * 20)])
    assert ids.shape == (4, 8) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    assert int(ids.min()) >= 0 and int(ids.max()) == 999
    assert ids[2].tolist()[:3] == [ids[2, 0].item(), 999, 0] and 1 <= ids[2, 0] <= 998
    assert ids[3, -1] == 999  # truncated to the context, the end token kept


def test_mobileclip_is_reparameterised_before_tracing_and_computes_what_the_trained_tower_does():
    tower = load_image_tower(ModelSpec("TM-Tiny-MobileCLIP")).model.visual
    generator = torch.Generator().manual_seed(0)
    for module in tower.modules():  # BatchNorm statistics of a trained tower: folding them is not a no-op
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    folded, count = for_inference(tower)
    assert count > 0 and folded is not tower
    pixels = torch.randn(3, 3, 64, 64, generator=generator)
    with torch.no_grad():
        assert (folded(pixels) - tower(pixels)).abs().max() <= 1e-4
    macs = {name: count_macs(to_onnx(module, pixels[:1], "pixel_values", "features", 17, name, None))["total"]
            for name, module in (("trained", tower), ("folded", folded))}
    assert macs["folded"] < macs["trained"], macs
    # a tower with nothing to fold is the tower itself
    plain = load_image_tower(ModelSpec("TM-Tiny-ViT")).model.visual
    assert for_inference(plain) == (plain, 0)


def test_macs_of_a_siglip_tower_are_counted_from_its_structure_alone(tmp_path):
    """SigLIP's attention pool leaves onnx's shape inference an open dimension (its query expanded
    through Where); the symbolic inference that fills it must work on a graph read without its
    external data too, as graphs past 2 GiB are counted (ViT-gopt-16-SigLIP2 was not)."""
    from transmiter_deploy.deploy.graph_cost import count_macs_file
    from transmiter_deploy.deploy.trace import export_graph

    tower = load_image_tower(ModelSpec("TM-Tiny-SigLIP")).model.visual
    pixels = torch.randn(2, 3, 32, 32)
    export_graph(tower, pixels, "pixel_values", "features", 17, "tiny SigLIP", tmp_path / "inline.onnx")
    export_graph(tower, pixels, "pixel_values", "features", 17, "tiny SigLIP", tmp_path / "external.onnx", 0)
    assert (tmp_path / "external.onnx.data").exists()
    inline = count_macs_file(tmp_path / "inline.onnx")["total"]
    assert inline > 0 and count_macs_file(tmp_path / "external.onnx")["total"] == inline


def test_every_family_of_the_matrix_is_a_packaged_architecture():
    from transmiter_deploy.features.models import known_models

    assert set(FAMILIES) <= set(known_models())
    assert len({pair[0] for pair in FAMILY_PAIRS}) == len({pair[1] for pair in FAMILY_PAIRS}) == len(FAMILIES)
