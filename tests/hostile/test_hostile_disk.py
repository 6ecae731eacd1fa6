"""A full disk: each writing command run under a file-size limit (RLIMIT_FSIZE) that cuts its
artifact part-way. Required: one line naming the output, exit status 5, nothing half-written, the
previous artifact byte-identical, and the next run without a limit completes."""

import json
import shutil
from pathlib import Path

import pytest

from hostile_support import extract_args, leftovers, one_line, run_cli, run_cli_here, snapshot

FRACTIONS = (0.0, 0.4, 0.9)  # of the command's largest file: cut at the first byte, part-way, near the end


def _commands(flow: Path, out: Path) -> dict[str, list]:
    return {
        "cache": ["cache", "--model", "TM-Tiny-RN", "--data", flow / "images", "--out", out],
        "head": ["head", "--model", "TM-Tiny-RN", "--classes-from", flow / "h_src", "--templates", "photo",
                 "--out", out],
        "extract": extract_args(flow, out),
        "export-onnx": ["export-onnx", "--model", "TM-Tiny-RN", "--adapter", flow / "a_tgt", "--head", flow / "h_tgt",
                        "--images", flow / "images", "--samples", 4, "--no-fp16", "--out", out],
    }


@pytest.fixture(scope="module")
def finished(flow, tmp_path_factory):
    """Each command's artifact, written once without a limit: its largest file sets the limits."""
    from transmiter_deploy.cli import main

    root = tmp_path_factory.mktemp("disk-reference")
    done = {}
    for name in _commands(flow, root):
        out = root / name
        assert main(["--quiet", *map(str, _commands(flow, out)[name])]) == 0, name
        done[name] = out
    return done


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("command", ["cache", "head", "extract", "export-onnx"])
def test_a_full_disk_leaves_the_previous_artifact_and_no_partial_one(flow, finished, tmp_path, command, fraction,
                                                                     capfd):
    previous = tmp_path / "artifact"
    shutil.copytree(finished[command], previous)
    before = snapshot(previous)
    largest = max(p.stat().st_size for p in finished[command].rglob("*") if p.is_file())
    limit = max(1, int(largest * fraction))
    result = run_cli(*_commands(flow, previous)[command], limit=limit)
    assert result.returncode == 5, (limit, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("transmiter: error: cannot write ") and "File too large" in line, line
    assert str(previous) in line or str(tmp_path) in line, line
    assert snapshot(previous) == before  # the earlier artifact is byte-identical
    assert leftovers(tmp_path) == []
    if fraction == FRACTIONS[1]:
        # the failed run left exactly what was there before (above), whatever the cut: one run
        # without a limit per command shows that state completes
        again = run_cli_here(capfd, *_commands(flow, previous)[command])
        assert again.returncode == 0, again.stderr
        assert leftovers(tmp_path) == []


def test_a_full_disk_without_an_earlier_artifact_leaves_nothing(flow, finished, tmp_path):
    out = tmp_path / "new"
    result = run_cli(*_commands(flow, out)["cache"], limit=100)
    assert result.returncode == 5 and "cannot write" in one_line(result.stderr)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_build_engine_record_under_a_full_disk(finished, tmp_path, capfd):
    """Without TensorRT the command writes the trtexec record (exit 3); a limit that cuts that
    record fails with 5 instead, and leaves no half-written record."""
    graph = finished["export-onnx"] / "model.onnx"
    engine = tmp_path / "model.engine"
    result = run_cli("build-engine", graph, "--out", engine, limit=64)
    assert result.returncode == 5, result.stderr
    assert "cannot write" in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    result = run_cli_here(capfd, "build-engine", graph, "--out", engine)
    assert result.returncode == 3, result.stderr  # no TensorRT here: the record is written
    assert json.loads((tmp_path / "model.engine.json").read_text())["trtexec"]


@pytest.mark.slow
def test_a_full_disk_mid_pipeline_export_resumes_on_the_next_run(demo_export, tmp_path, capfd):
    """``transmiter export`` cut by the limit part-way through the ONNX step: one line, exit 5,
    the finished earlier steps kept, and the next run completes from them."""
    recipe, outcome = demo_export
    out = tmp_path / "out"
    shutil.copytree(outcome.out_dir, out)
    for step in ("onnx", "engines", "references"):
        shutil.rmtree(out / step, ignore_errors=True)
    kept = snapshot(out / "adapters")
    limit = (outcome.out_dir / "onnx" / "model.onnx").stat().st_size // 2
    result = run_cli("export", recipe.path, "--out", out, limit=limit)
    assert result.returncode == 5, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()  # the steps' progress, then the one error line
    assert "Traceback" not in result.stderr and [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("transmiter: error: cannot write ") and "File too large" in lines[-1]
    assert snapshot(out / "adapters") == kept
    assert not (out / "onnx").exists() and leftovers(out) == []
    again = run_cli_here(capfd, "export", recipe.path, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "onnx" / "manifest.json").is_file()
