"""A `transmiter export` killed mid-write (SIGKILL: no cleanup code runs) damages nothing, and the
next run clears its leftovers and completes."""

import json
import signal
import time
from pathlib import Path

import pytest

from cli_process import CliProcess
from transmiter_deploy.artifacts import sha256_file
from transmiter_deploy.pipeline.export import run_export
from transmiter_deploy.pipeline.recipe import load_recipe

RECIPE = """\
name: killed
source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}
finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}
target: {name: TM-Demo-Target, demo_weights: TM-Demo-Target}
data: {demo_task: colours-tinted, train_per_class: TRAIN, test_per_class: 4}
head: {logit_width: 32}
extraction: {epochs: 1}
plus: {shots: 2, epochs: 1}
export: {precisions: [fp32]}
"""


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


@pytest.mark.slow
def test_sigkill_mid_write_leaves_the_previous_export_intact(tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text(RECIPE.replace("TRAIN", "10"))
    out = tmp_path / "out"
    run_export(load_recipe(first), out, progress=False, log=lambda _: None)
    before = snapshot(out)

    bigger = tmp_path / "bigger.yaml"  # more images: the data step re-renders for several seconds
    bigger.write_text(RECIPE.replace("TRAIN", "400"))
    process = CliProcess(["--quiet", "export", bigger, "--out", out])  # a child: the kill is the point
    process.wait_for_stderr("[run ] data", timeout=120)
    time.sleep(1.0)  # inside the render: its staging directory exists and is half full
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert list(out.glob(".data.*.partial"))  # the half-written staging directory it left
    assert snapshot(out) == before  # every artifact of the previous run is byte for byte intact
    assert json.loads((out / "report.json").read_text())["name"] == "killed"

    # the next run (a smaller one than the killed run: what it shows is the same, in a third of
    # this test's time) clears the dead run's staging directory and completes
    after = tmp_path / "after.yaml"
    after.write_text(RECIPE.replace("TRAIN", "20"))
    outcome = run_export(load_recipe(after), out, progress=False, log=lambda _: None)
    assert not list(out.rglob(".*.partial"))
    assert {step.name: step.status for step in outcome.steps}["data"] == "ran"
    assert len(list((out / "data" / "train").rglob("*.png"))) == 20 * 8  # 20 per class, 8 colours


def test_export_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    from transmiter_deploy.cli import main

    recipe = Path(__file__).resolve().parents[2] / "export" / "recipes" / "demo.yaml"
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")
    for out in (existing, existing / "below"):
        assert main(["export", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a directory" in err and "Traceback" not in err
    assert existing.read_bytes() == b"keep me"
