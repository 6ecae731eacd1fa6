"""ONNX external data (graphs past 2 GB: ``model.onnx`` + ``model.onnx.data``) forced on tiny
models by a low threshold: every graph written that way, listed and hashed in its manifest,
loaded and run with the results of the inline export, still loadable after the directory
moves, counted by the MAC counter; a missing, truncated, swapped, tampered or renamed data file
refused in one line with exit status 2 by the commands that read exports. The C++ backend's
side is tests/cpp/test_cpp_external_data.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.deploy.graph_cost import count_macs_file
from transmiter_deploy.deploy.onnx_export import ExportSettings, export_deployment, parity_pixels
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.models import ModelSpec, load_model
from transmiter_deploy.runtimes.onnx_files import (DEFAULT_EXTERNAL_DATA_THRESHOLD, EXTERNAL_DATA_ENV,
                                                   external_data_locations, graph_structure, require_loadable,
                                                   resolve_external_data_threshold, save_graph, verify_graph_data)
from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

from conftest import damage_external_data, make_head_and_adapter, polygraphy_validate
from hostile.hostile_support import one_line, run_cli_here, snapshot

K = 6
GRAPHS = ("model.onnx", "head.onnx", "model_fp16.onnx", "head_fp16.onnx")


def _inputs(out: Path, graph: str, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
    return pixels if graph.startswith(("model", "backbone")) else features


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same tiny model, head and adapter exported inline (the default threshold) and with
    external data forced by the environment variable (threshold 0); and a bank of the same model
    with external data (backbone, head export, fused graphs)."""
    from transmiter_deploy.deploy.bank import BankTask, assemble_bank, export_backbone, export_head, read_backbone, read_head

    root = tmp_path_factory.mktemp("external-data")
    model = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    head, artifact = make_head_and_adapter(model.model.visual.output_dim, 64, K, model=model)
    pixels = parity_pixels(model, None, count=8)
    export_deployment(model, head, artifact, root / "inline", pixels, log=lambda _: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EXTERNAL_DATA_ENV, "0")
        export_deployment(model, head, artifact, root / "external", pixels, log=lambda _: None)
    forced = ExportSettings(external_data_threshold=0)
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.model.visual(pixels).float(), dim=-1)
    export_backbone(model, root / "backbone", pixels, forced, log=lambda _: None)
    export_head(head, artifact, features, root / "head-export", forced, log=lambda _: None)
    assemble_bank(root / "bank", read_backbone(root / "backbone"), [BankTask("tiny", read_head(root / "head-export"))],
                  log=lambda _: None, external_data_threshold=0)
    return root, pixels.numpy(), features.numpy()


def test_every_graph_has_its_data_file_listed_and_hashed_in_the_manifest(exports):
    root, _, _ = exports
    manifest = json.loads((root / "external" / "manifest.json").read_text())
    graphs = [name for name in manifest["files"] if name.endswith(".onnx")]
    assert sorted(graphs) == sorted(GRAPHS)
    for name in graphs:
        entry = manifest["files"][name]
        assert entry["external_data"] == [f"{name}.data"]
        assert external_data_locations(graph_structure(root / "external" / name)) == [f"{name}.data"]
        data = manifest["files"][f"{name}.data"]
        assert data["external_data_of"] == name and data["precision"] == entry["precision"]
        path = root / "external" / f"{name}.data"
        assert data["sha256"] == sha256_file(path) and data["bytes"] == path.stat().st_size > 10_000
        assert entry["bytes"] < data["bytes"]  # the structure stays in the graph, the weights moved out
        onnx.checker.check_model(str(root / "external" / name), full_check=True)
    # the data files are the ones listed, nothing else beside them; the inline export has none
    on_disk = {p.name for p in (root / "external").iterdir()}
    assert on_disk == set(manifest["files"]) | {"manifest.json", "parity.json"}
    inline = json.loads((root / "inline" / "manifest.json").read_text())
    assert not any("external_data" in entry for entry in inline["files"].values())
    assert not list((root / "inline").glob("*.data"))
    assert not [p for p in root.iterdir() if ".partial" in p.name]  # no staging left behind


def test_every_graph_runs_as_the_inline_export_does_and_after_the_directory_moves(exports, tmp_path):
    root, pixels, features = exports
    moved = tmp_path / "elsewhere" / "renamed-export"
    shutil.copytree(root / "external", moved)
    for name in GRAPHS:
        batch = _inputs(root, name, pixels, features)
        with OnnxRuntimeRunner(root / "inline" / name) as runner:
            inline = runner.infer(batch)
        for directory in (root / "external", moved):
            with OnnxRuntimeRunner(directory / name) as runner:  # checks the data file first
                got = runner.infer(batch)
            assert np.abs(got - inline).max() <= 1e-5, (name, directory)
    # ONNX Runtime at every optimisation level in the child-process probe, from the moved copy
    require_loadable([moved / name for name in GRAPHS])
    # a copy that keeps the data file but moves the graph away from it cannot load, in one line
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(moved / "model.onnx", lonely / "model.onnx")
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data of model\.onnx is missing"):
        verify_graph_data(lonely / "model.onnx")


def test_polygraphy_validates_every_external_data_graph_with_onnxruntime(exports):
    root, _, _ = exports
    for directory in (root / "external", root / "bank"):
        for graph in sorted(directory.rglob("*.onnx")):
            assert external_data_locations(graph_structure(graph)), graph
            polygraphy_validate(graph)


def test_parity_checks_and_macs_of_the_external_export_equal_the_inline_ones(exports):
    root, _, _ = exports
    parity = {kind: json.loads((root / kind / "parity.json").read_text()) for kind in ("inline", "external")}
    assert all(check["passed"] for check in parity["external"]["checks"].values() if check["required"])
    assert parity["external"]["macs"] == parity["inline"]["macs"]
    for name in GRAPHS:
        assert count_macs_file(root / "external" / name) == count_macs_file(root / "inline" / name)
    assert count_macs_file(root / "external" / "model.onnx")["total"] == parity["inline"]["macs"]["model"]["total"]


def test_the_bank_links_and_lists_every_data_file_and_matches_its_parts(exports):
    from transmiter_deploy.deploy.bank import read_bank

    root, pixels, _ = exports
    bank = read_bank(root / "bank")  # verifies every file, data files included
    files = bank.manifest["files"]
    for graph in ("backbone.onnx", "backbone_fp16.onnx", "model.onnx", "model_fp16.onnx",
                  "heads/tiny/head.onnx", "heads/tiny/head_fp16.onnx"):
        data = f"{graph}.data"
        assert files[graph]["external_data"] == [Path(data).name], graph
        assert files[data]["sha256"] == sha256_file(root / "bank" / data)
    # parts linked in byte for byte, data files with their graphs
    assert sha256_file(root / "bank" / "backbone.onnx.data") == sha256_file(root / "backbone" / "backbone.onnx.data")
    with OnnxRuntimeRunner(root / "bank" / "model.onnx") as fused, OnnxRuntimeRunner(root / "inline" / "model.onnx") as single:
        assert np.abs(fused.infer_outputs(pixels)["logits_tiny"] - single.infer(pixels)).max() <= 1e-4


def test_the_threshold_setting_env_and_default():
    assert resolve_external_data_threshold(None) == DEFAULT_EXTERNAL_DATA_THRESHOLD < 2**31
    assert resolve_external_data_threshold(5) == 5
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EXTERNAL_DATA_ENV, "123")
        assert resolve_external_data_threshold(None) == 123
        assert resolve_external_data_threshold(7) == 7  # the recipe's or the CLI's setting wins
        patch.setenv(EXTERNAL_DATA_ENV, "2GB")
        with pytest.raises(InputError, match=EXTERNAL_DATA_ENV):
            resolve_external_data_threshold(None)
    with pytest.raises(InputError, match="external_data_threshold"):
        ExportSettings(external_data_threshold=-1)


def test_save_graph_keeps_the_callers_model_and_never_writes_through_an_old_data_file(tmp_path):
    """onnx moves tensors out of the model it saves and appends to an existing data file: the
    caller's model keeps its tensors, and a data file hard-linked from an earlier artifact is
    replaced, not written through."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32).reshape(32, 32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    old = tmp_path / "old.data"
    old.write_bytes(b"an earlier artifact's tensors")
    (tmp_path / "g.onnx.data").hardlink_to(old)
    assert save_graph(model, tmp_path / "g.onnx", external_data_threshold=0) == ["g.onnx.data"]
    assert model.SerializeToString() == before
    assert old.read_bytes() == b"an earlier artifact's tensors"
    assert (tmp_path / "g.onnx.data").stat().st_size == 1024 * 4
    assert save_graph(model, tmp_path / "inline.onnx") == [] and not (tmp_path / "inline.onnx.data").exists()


# ---- bad input ---------------------------------------------------------------------------------

# What the one-line error must name, per way of damaging the data file (conftest.damage_external_data).
EXPECTED = {"missing": "model.onnx.data of model.onnx is missing", "renamed": "model.onnx.data of model.onnx is missing",
            "truncated": "model.onnx.data has", "swapped": "model.onnx.data has",
            "tampered": "model.onnx.data does not match the sha256",
            "graph-points-elsewhere": "points at external data 'model_fp16.onnx.data'"}


BAD_CASES = list(EXPECTED)


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_data_file_is_refused_in_one_line_by_the_runner_and_build_engine(exports, tmp_path, case, capfd):
    root, pixels, _ = exports
    bad = shutil.copytree(root / "external", tmp_path / "bad")
    damage_external_data(bad, case)
    expected = EXPECTED[case]
    with pytest.raises(IntegrityError, match=re.escape(expected)):
        OnnxRuntimeRunner(bad / "model.onnx").activate()
    result = run_cli_here(capfd, "build-engine", bad / "model.onnx", "--out", tmp_path / "engines" / "model.engine")
    assert result.returncode == 2, result.stderr
    assert expected in one_line(result.stderr)
    assert not (tmp_path / "engines").exists()  # refused before anything was written


@pytest.mark.parametrize("case", ["missing", "truncated", "swapped"])
def test_bank_add_refuses_a_head_whose_data_file_is_bad_and_leaves_the_bank_as_it_was(exports, tmp_path, case,
                                                                                       capfd):
    root, _, _ = exports
    bank = shutil.copytree(root / "bank", tmp_path / "bank")
    before = snapshot(bank)
    head = shutil.copytree(root / "external", tmp_path / "head")
    damage_external_data(head, case, graph="head.onnx", other="head_fp16.onnx")
    result = run_cli_here(capfd, "bank", "add", bank, "other", head)
    assert result.returncode == 2, result.stderr
    assert "head.onnx.data" in one_line(result.stderr)
    assert snapshot(bank) == before
    # the same head, intact, is added: the bank then lists its data files under heads/other/
    good = shutil.copytree(root / "external", tmp_path / "good")
    assert run_cli_here(capfd, "bank", "add", bank, "other", good).returncode == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["files"]["heads/other/head.onnx.data"]["sha256"] == sha256_file(good / "head.onnx.data")


@pytest.mark.parametrize("case", ["missing", "tampered"])
def test_bank_list_refuses_a_bank_whose_data_file_is_bad(exports, tmp_path, case, capfd):
    root, _, _ = exports
    bank = shutil.copytree(root / "bank", tmp_path / "bank")
    target = bank / "heads" / "tiny" / "head.onnx.data"
    if case == "missing":
        target.unlink()
    else:
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 0x01
        target.write_bytes(bytes(raw))
    result = run_cli_here(capfd, "bank", "list", bank)
    assert result.returncode == 2, result.stderr
    assert "head.onnx.data" in one_line(result.stderr)


def test_export_onnx_cli_flag_writes_external_data(flow, tmp_path, capfd):
    out = tmp_path / "export"
    result = run_cli_here(capfd, "export-onnx", "--model", "TM-Tiny-RN", "--adapter", flow / "a_tgt",
                          "--head", flow / "h_tgt",
                     "--images", flow / "images", "--samples", 4, "--no-fp16", "--external-data-threshold", 0,
                     "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["external_data"] == ["model.onnx.data"]
    assert manifest["files"]["head.onnx"]["external_data"] == ["head.onnx.data"]
    bad = run_cli_here(capfd, "export-onnx", "--model", "TM-Tiny-RN", "--adapter", flow / "a_tgt",
                       "--head", flow / "h_tgt",
                  "--external-data-threshold", -1, "--out", tmp_path / "never")
    assert bad.returncode == 2 and not (tmp_path / "never").exists()


def test_a_recipe_asks_for_external_data_and_only_the_graph_steps_run_again(demo_external_export):
    from transmiter_deploy.runtimes.compare import compare_outputs

    recipe, outcome = demo_external_export
    inline = outcome.out_dir.parent / "inline-onnx"  # the graphs it had before, from the same adapter and head
    assert recipe.export.external_data_threshold == 0
    ran = {step.name for step in outcome.steps if step.status == "ran"}
    assert "onnx" in ran and not ran & {"cache-source-train", "extract", "transfer", "plus"}, ran
    manifest = json.loads((outcome.export_dir / "manifest.json").read_text())
    graphs = [name for name in manifest["files"] if name.endswith(".onnx")]
    assert graphs and all(manifest["files"][name]["external_data"] == [f"{name}.data"] for name in graphs)
    # the validation step ran every graph of the new export against PyTorch, and passed
    assert outcome.validation and all(row["passed"] for row in outcome.validation)
    # only the storage changed: the same nodes and the same tensors (the head is folded in float64
    # and rounded once, so the same files give the same float32 and float16 values) ...
    for name in graphs:
        external, held = onnx.load(str(outcome.export_dir / name)), onnx.load(str(inline / name))
        assert [(n.op_type, list(n.input), list(n.output)) for n in external.graph.node] == [
            (n.op_type, list(n.input), list(n.output)) for n in held.graph.node], name
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in held.graph.initializer}
        for tensor in external.graph.initializer:
            value, reference = onnx.numpy_helper.to_array(tensor), weights[tensor.name]
            assert value.dtype == reference.dtype and np.array_equal(value, reference), (name, tensor.name)
        assert len(external.graph.initializer) == len(weights), name
    # ... and the same outputs
    pixels = np.random.default_rng(0).standard_normal((4, 3, *manifest["preprocess"]["image_size"])).astype(np.float32)
    for name in graphs:
        if name.startswith("model"):
            with OnnxRuntimeRunner(outcome.export_dir / name) as a, OnnxRuntimeRunner(inline / name) as b:
                assert compare_outputs(b.infer(pixels), a.infer(pixels))["max_abs"] <= 1e-6, name


def test_weights_apart_moves_inline_and_external_tensors_into_one_file_unchanged(tmp_path):
    # the TorchScript exporter, past 2 GiB, writes some tensors apart and keeps others in the graph
    from onnx import TensorProto, helper, numpy_helper

    from transmiter_deploy.runtimes.onnx_files import weights_apart

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.external_data_helper.convert_model_to_external_data(model, location="a.bin", size_threshold=0)
    for tensor in model.graph.initializer:  # only "a" goes apart; "b" stays in the graph
        if tensor.name == "b":
            tensor.ClearField("data_location")
            del tensor.external_data[:]
    (tmp_path / "src").mkdir()
    (tmp_path / "work").mkdir()
    onnx.save_model(model, str(tmp_path / "src" / "g.onnx"))
    structure, data_dir = weights_apart(tmp_path / "src" / "g.onnx", tmp_path / "work")
    assert data_dir == tmp_path / "work"
    assert all(t.data_location == TensorProto.EXTERNAL for t in structure.graph.initializer)
    onnx.external_data_helper.load_external_data_for_model(structure, str(data_dir))
    values = {t.name: numpy_helper.to_array(t) for t in structure.graph.initializer}
    assert np.array_equal(values["a"], a) and np.array_equal(values["b"], b)


def test_weights_apart_reads_an_external_tensor_without_a_length_entry(tmp_path):
    # the format leaves "length" optional, and the TorchScript exporter writes none
    from onnx import TensorProto, helper, numpy_helper

    from transmiter_deploy.runtimes.onnx_files import weights_apart

    a = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    b = np.ones((32, 32), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(b, "b")])
    external = graph.initializer.add()
    external.name, external.data_type = "a", TensorProto.FLOAT
    external.dims.extend(a.shape)
    external.data_location = TensorProto.EXTERNAL
    entry = external.external_data.add()
    entry.key, entry.value = "location", "a.bin"
    (tmp_path / "src").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(a.tobytes())
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "src" / "g.onnx"))
    structure, data_dir = weights_apart(tmp_path / "src" / "g.onnx", tmp_path / "work")
    onnx.external_data_helper.load_external_data_for_model(structure, str(data_dir))
    values = {t.name: numpy_helper.to_array(t) for t in structure.graph.initializer}
    assert np.array_equal(values["a"], a) and np.array_equal(values["b"], b)
