"""The CLI end to end on tiny real open_clip architectures with random weights."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.cli import main

from conftest import make_image_folder


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def workspace(flow):
    """The session's tiny workspace (``flow`` in tests/conftest.py): caches and heads of a source
    (tiny ViT), a 'fine-tuned' teacher and a target (tiny ResNet), and the flow's adapters. Tests
    read it and write their own artifacts under their ``tmp_path``."""
    return flow


def test_full_flow_extract_transfer_plus_evaluate(workspace, capsys, tmp_path):
    w, mine = workspace, tmp_path  # the workspace's caches and heads; this test's adapters
    code, out, err = run(capsys, "extract", "--source-cache", w / "c_src", "--source-head", w / "h_src",
                         "--teacher-cache", w / "c_ft", "--teacher-head", w / "h_ft", "--epochs", 3,
                         "--batch-size", 8, "--out", mine / "a_src")
    assert code == 0, err
    assert "extracted adapter" in out
    code, out, err = run(capsys, "transfer", "--adapter", mine / "a_src", "--source-cache", w / "c_src",
                         "--source-head", w / "h_src", "--target-cache", w / "c_tgt", "--target-head", w / "h_tgt",
                         "--out", mine / "a_tgt")
    assert code == 0, err
    manifest = json.loads((mine / "a_tgt" / "adapter.json").read_text())
    assert manifest["stage"] == "transferred"
    assert manifest["target_model"]["name"] == "TM-Tiny-RN"
    assert manifest["provenance"]["transfer"]["lambda"] == 500.0
    head_manifest = json.loads((w / "h_tgt" / "head.json").read_text())
    assert manifest["provenance"]["transfer"]["target_head_sha256"] == head_manifest["files"]["head.safetensors"]["sha256"]
    assert manifest["provenance"]["extraction"]["settings"]["epochs"] == 3
    assert manifest["config"]["logit_width"] == 32 and manifest["config"]["num_task_classes"] == 4
    assert len(manifest["auxiliary_names"]) == 28
    code, out, err = run(capsys, "plus", "--adapter", mine / "a_tgt", "--cache", w / "c_tgt", "--head", w / "h_tgt",
                         "--shots", 2, "--epochs", 2, "--out", mine / "a_plus")
    assert code == 0, err
    assert json.loads((mine / "a_plus" / "adapter.json").read_text())["provenance"]["plus"]["num_samples"] == 8
    code, out, err = run(capsys, "evaluate", "--cache", w / "c_tgt", "--head", w / "h_tgt", "--adapter",
                         mine / "a_tgt", "--adapter", mine / "a_plus", "--json", mine / "results.json")
    assert code == 0, err
    assert "base" in out and "HM" in out
    rows = json.loads((mine / "results.json").read_text())["rows"]
    assert [r["name"].split()[0] for r in rows] == ["zero-shot", "+", "+"]
    assert all(0 <= r["base"] <= 100 and r["num_base_classes"] == 2 for r in rows)


def expect_error(capsys, args, message, status=2):
    code, out, err = run(capsys, *args)
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transmiter: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


def test_cache_from_another_model_than_the_head(workspace, capsys):
    expect_error(capsys, ["evaluate", "--cache", workspace / "c_tgt", "--head", workspace / "h_src"],
                 "was made by TM-Tiny-RN")


def test_mismatched_class_list_between_adapter_and_target_head(workspace, capsys, tmp_path):
    w = workspace
    assert main(["head", "--model", "TM-Tiny-RN", "--classes-from", str(w / "c_src"), "--width", "32", "--seed", "9",
                 "--templates", "photo", "--out", str(tmp_path / "h_other")]) == 0
    capsys.readouterr()
    expect_error(capsys, ["transfer", "--adapter", w / "a_src", "--source-cache", w / "c_src", "--source-head",
                          w / "h_src", "--target-cache", w / "c_tgt", "--target-head", tmp_path / "h_other",
                          "--out", tmp_path / "a"], "class list")
    assert not (tmp_path / "a").exists()


def test_bad_artifacts_and_data_give_one_line_and_status_2(workspace, capsys, tmp_path):
    w = workspace
    broken = tmp_path / "c_broken"
    shutil.copytree(w / "c_src", broken)
    shard = broken / "features-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    expect_error(capsys, ["evaluate", "--cache", broken, "--head", w / "h_src"], "sha256")

    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["cache", "--model", "TM-Tiny-ViT", "--data", tmp_path / "empty", "--out", tmp_path / "c"],
                 "is empty")
    stray = make_image_folder(tmp_path / "stray", per_class=1)
    (stray / "red" / "readme.md").write_text("x")
    expect_error(capsys, ["cache", "--model", "TM-Tiny-ViT", "--data", stray, "--out", tmp_path / "c"],
                 "not an image file")
    (stray / "red" / "readme.md").unlink()
    expect_error(capsys, ["cache", "--model", "ViT-B-61", "--data", stray, "--out", tmp_path / "c"],
                 "open_clip does not know model 'ViT-B-61'; close matches: ViT-B-16")
    assert not (tmp_path / "c").exists()


def _rewrite_shard(cache_dir: Path, edit) -> None:
    shard = cache_dir / "features-00000.safetensors"
    tensors = load_file(shard)
    edit(tensors["features"])
    save_file(tensors, shard)
    manifest = json.loads((cache_dir / "cache.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(shard)
    (cache_dir / "cache.json").write_text(json.dumps(manifest))


def test_nan_features_and_constant_logits_refused_without_partial_output(workspace, capsys, tmp_path):
    w = workspace
    args = ["extract", "--source-head", w / "h_src", "--teacher-cache", w / "c_ft", "--teacher-head", w / "h_ft",
            "--epochs", 1, "--out", tmp_path / "a"]
    nan_cache = tmp_path / "c_nan"
    shutil.copytree(w / "c_src", nan_cache)
    _rewrite_shard(nan_cache, lambda f: f[3].fill_(float("nan")))
    expect_error(capsys, ["extract", "--source-cache", nan_cache, *args[1:]], "NaN")
    flat_cache = tmp_path / "c_flat"
    shutil.copytree(w / "c_src", flat_cache)
    _rewrite_shard(flat_cache, lambda f: f[5].zero_())  # zero feature -> all logits 0 -> sigma = 0
    expect_error(capsys, ["extract", "--source-cache", flat_cache, *args[1:]], "constant logits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_flat", "c_nan"]


FLOW_COMMANDS = ["cache", "head", "extract", "transfer", "plus", "evaluate"]


@pytest.mark.parametrize("command", FLOW_COMMANDS)
def test_every_flow_command_help_has_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Example:" in out, command


def test_console_script_help_and_exit_status(tmp_path):
    """The installed script itself, in new interpreters: what its own process prints and returns
    (the help of every command is checked in-process above; here one, through the script)."""
    exe = Path(sys.executable).parent / "transmiter"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "transmiter_deploy.cli"]
    result = subprocess.run([*command, FLOW_COMMANDS[0], "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in result.stdout
    result = subprocess.run([*command, "evaluate", "--cache", str(tmp_path / "x"), "--head", str(tmp_path / "y")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"transmiter: error: feature cache manifest not found: {tmp_path / 'x' / 'cache.json'}"
    result = subprocess.run([*command, "--debug", "evaluate", "--cache", str(tmp_path / "x"), "--head", "y"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_export_onnx_command_and_its_refusals(workspace, capsys, tmp_path):
    w = workspace
    code, out, err = run(capsys, "export-onnx", "--model", "TM-Tiny-RN", "--adapter", w / "a_tgt", "--head",
                         w / "h_tgt", "--images", w / "images", "--samples", 6, "--out", tmp_path / "export")
    assert code == 0, err
    assert "onnx_fp32_vs_torch" in out and "MACs at batch 1" in out
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["class_names"] == json.loads((w / "a_tgt" / "adapter.json").read_text())["class_names"]
    assert manifest["adapter_sha256"] == json.loads((w / "a_tgt" / "adapter.json").read_text())["files"][
        "adapter.safetensors"]["sha256"]
    # the adapter applies to TM-Tiny-RN seed 0, not to another initialisation
    expect_error(capsys, ["export-onnx", "--model", "TM-Tiny-RN", "--init-seed", 3, "--adapter", w / "a_tgt",
                          "--head", w / "h_tgt", "--out", tmp_path / "other"], "not to the model named")
    # a head whose class list is not the adapter's
    expect_error(capsys, ["export-onnx", "--model", "TM-Tiny-RN", "--adapter", w / "a_tgt", "--head", w / "h_src",
                          "--out", tmp_path / "other"], "the head is for TM-Tiny-ViT")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect_error(capsys, ["export-onnx", "--model", "TM-Tiny-RN", "--adapter", w / "a_tgt", "--head", w / "h_tgt",
                          "--no-fp16", "--out", blocker / "sub"], "cannot write to output directory")
    assert not (tmp_path / "other").exists()
