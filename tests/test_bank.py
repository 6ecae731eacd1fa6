"""Task banks: recipes with several tasks, the bank export, growing and shrinking it, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import SMALL_DEMO, THIRD_BANK_TASK, bank_recipe_text, copy_tree, make_head_and_adapter
from transmiter_deploy.cli import main
from transmiter_deploy.deploy.bank import (BankTask, add_task, assemble_bank, export_head, read_bank, read_backbone,
                                           read_head, remove_task)
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.pipeline.recipe import RecipeError, load_recipe


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ---- recipes --------------------------------------------------------------------------------

def test_bank_recipe_tasks_inherit_and_merge_the_top_level(tmp_path):
    text = bank_recipe_text().replace("    data: {demo_task: textures-foggy}\n",
                                      "    data: {demo_task: textures-foggy}\n    plus: {epochs: 5}\n")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.bank and [t.name for t in recipe.tasks] == ["colours_tinted", "textures_foggy"]
    tinted, foggy = recipe.tasks
    assert tinted.head.logit_width == 64 and foggy.head.logit_width == 64  # inherited
    assert tinted.data.train_per_class == 40 and foggy.data.demo_task == "textures-foggy"  # merged key by key
    assert tinted.plus.epochs == 2 and foggy.plus.epochs == 5 and foggy.plus.shots == 2  # override keeps the rest
    assert foggy.finetuned.demo_weights == "TM-Demo-Source-ft-textures-foggy"


def test_single_task_recipe_is_a_bank_of_one(tmp_path):
    recipe = load_recipe(_write(tmp_path, SMALL_DEMO))
    assert not recipe.bank and len(recipe.tasks) == 1
    assert recipe.tasks[0].data == recipe.data and recipe.tasks[0].finetuned == recipe.finetuned


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("name: textures_foggy", "name: colours_tinted"), "tasks[1].name"),
    (lambda t: t.replace("name: textures_foggy", "name: textures-foggy"), "tasks[1].name"),
    (lambda t: t.replace("name: textures_foggy", "name: 2textures"), "tasks[1].name"),
    (lambda t: t.replace("    data: {demo_task: textures-foggy}\n", "    data: {demo_task: textures-foggy}\n"
                         "    target: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}\n"), "tasks.textures_foggy.target"),
    (lambda t: t.replace("    data: {demo_task: textures-foggy}\n", "    data: {demo_task: textures-foggy}\n"
                         "    adaptr: {latent_dim: 8}\n"), "tasks.textures_foggy.adaptr"),
    (lambda t: t.replace("data: {demo_task: textures-foggy}", "data: {demo_task: nope}"),
     "tasks.textures_foggy.data.demo_task"),
    (lambda t: t.replace("demo_weights: TM-Demo-Source-ft-textures-foggy", "demo_weights: missing"),
     "tasks.textures_foggy.finetuned.demo_weights"),
    (lambda t: t.replace("plus: {shots: 2, epochs: 2}", "plus: {shots: 0, epochs: 2}"), "tasks.colours_tinted.plus.shots"),
    (lambda t: t.replace("precisions: [fp32, fp16]", "precisions: [fp32, fp16, fp16]"), "export.precisions"),
    (lambda t: t.split("tasks:")[0] + "tasks: []\nexport: {precisions: [fp32]}\n", "tasks"),
    (lambda t: t.replace("data: {train_per_class: 40, test_per_class: 8}", "data: 7"), "data"),
    (lambda t: t.replace("data: {train_per_class: 40, test_per_class: 8}", "data: {train_per_clas: 4}"),
     "tasks.colours_tinted.data.train_per_clas"),
])
def test_bank_recipe_errors_name_the_task_and_key(tmp_path, edit, key):
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path, edit(bank_recipe_text())))
    message = str(caught.value)
    assert f": {key}:" in message and "\n" not in message


# ---- the bank export ------------------------------------------------------------------------

def test_bank_export_writes_the_documented_layout(demo_bank_export):
    bank = read_bank(demo_bank_export / "onnx")  # every file verified against the manifest
    assert bank.task_names == ["colours_tinted", "textures_foggy"]
    manifest = bank.manifest
    assert manifest["graphs"] == {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
    assert manifest["backbone"]["sha256"] == _sha256(demo_bank_export / "onnx" / "backbone.onnx")
    for task in manifest["tasks"]:
        assert task["output"] == f"logits_{task['name']}" and task["probabilities"] is None
        assert (demo_bank_export / "onnx" / task["head"]["safetensors"]).is_file()
        assert task["adapter"]["stage"] == "plus" and task["class_names"]
    session = ort.InferenceSession(str(demo_bank_export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits_colours_tinted", "logits_textures_foggy"]
    report = (demo_bank_export / "report.md").read_text()
    assert "## Accuracy: task colours_tinted" in report and "## Accuracy: task textures_foggy" in report


def test_bank_outputs_equal_backbone_then_each_head(demo_bank_export):
    """The fused bank computes the backbone once and each head on its features."""
    onnx_dir = demo_bank_export / "onnx"
    pixels = np.random.default_rng(3).standard_normal((5, 3, 48, 48), dtype=np.float32)
    cpu = ["CPUExecutionProvider"]
    outputs = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=cpu).run(None, {"pixel_values": pixels})
    features = ort.InferenceSession(str(onnx_dir / "backbone.onnx"), providers=cpu).run(None, {"pixel_values": pixels})[0]
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    for task, output in zip(["colours_tinted", "textures_foggy"], outputs):
        head = ort.InferenceSession(str(onnx_dir / "heads" / task / "head.onnx"), providers=cpu)
        expected = head.run(None, {"image_features": features})[0]
        assert output.shape == expected.shape and np.abs(output - expected).max() <= 1e-5


def test_bank_task_accuracy_equals_the_single_task_export(demo_bank_export, demo_export):
    _, single = demo_export
    bank = json.loads((demo_bank_export / "report.json").read_text())["task_accuracy"]["colours_tinted"]
    assert bank == single.accuracy


def test_bank_validation_passes_on_every_output(demo_bank_export):
    validation = json.loads((demo_bank_export / "validation.json").read_text())
    outputs = {(row["graph"], row["output"]) for row in validation["rows"]}
    assert {("model.onnx", "logits_colours_tinted"), ("model_fp16.onnx", "logits_textures_foggy")} <= outputs
    assert all(row["passed"] for row in validation["rows"])


def test_adding_and_removing_a_task_keeps_the_backbone_and_other_heads(demo_bank_export, tmp_path):
    from transmiter_deploy.pipeline.bank_export import run_bank_export

    out = copy_tree(demo_bank_export, tmp_path / "out")
    before = _hashes(out / "onnx")
    engines_before = _hashes(out / "engines")
    recipe = load_recipe(_write(tmp_path, bank_recipe_text(THIRD_BANK_TASK)))
    grown = run_bank_export(recipe, out, progress=False, log=lambda _: None)
    ran = {step.name for step in grown.steps if step.status == "ran"}
    assert ran and all(name.startswith("colours_dusk.") for name in ran - {"bank", "validate"})
    assert "backbone" not in ran and not any(name.startswith(("colours_tinted.", "textures_foggy.")) for name in ran)
    after = _hashes(out / "onnx")
    kept = [name for name in before if name.startswith(("backbone", "heads/"))]
    assert kept and all(after[name] == before[name] for name in kept)
    assert any(name.startswith("heads/colours_dusk/") for name in after)
    assert after["model.onnx"] != before["model.onnx"]
    assert all(_hashes(out / "engines")[name] == digest for name, digest in engines_before.items()
               if name.startswith("backbone"))

    shrunk = run_bank_export(load_recipe(_write(tmp_path, bank_recipe_text())), out, progress=False, log=lambda _: None)
    assert {step.name for step in shrunk.steps if step.status == "ran"} <= {"bank", "validate"}
    again = _hashes(out / "onnx")
    assert again.keys() == before.keys()
    # composing is deterministic: the two-task graphs come back byte for byte
    assert all(again[name] == before[name] for name in before if name not in ("manifest.json",))


# ---- editing a bank directly -----------------------------------------------------------------

def test_bank_add_and_remove_from_the_cli(demo_bank_export, demo_export, tmp_path, capsys):
    bank_dir = copy_tree(demo_bank_export / "onnx", tmp_path / "bank")
    single = demo_export[1].export_dir
    before = _hashes(bank_dir)
    assert main(["bank", "add", str(bank_dir), "tinted_again", str(single)]) == 0
    bank = read_bank(bank_dir)
    assert bank.task_names == ["colours_tinted", "textures_foggy", "tinted_again"]
    pixels = np.random.default_rng(0).standard_normal((3, 3, 48, 48), dtype=np.float32)
    outputs = dict(zip(["a", "b", "c"], ort.InferenceSession(str(bank_dir / "model.onnx"), providers=[
        "CPUExecutionProvider"]).run(None, {"pixel_values": pixels})))
    single_logits = ort.InferenceSession(str(single / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels})[0]
    assert np.abs(outputs["c"] - single_logits).max() <= 1e-4  # the added head is the single export's
    assert main(["bank", "list", str(bank_dir)]) == 0
    assert "tinted_again" in capsys.readouterr().out
    assert main(["bank", "remove", str(bank_dir), "tinted_again"]) == 0
    after = _hashes(bank_dir)
    assert all(after[name] == digest for name, digest in before.items() if name != "manifest.json")


@pytest.mark.parametrize("argv_tail, message", [
    (["remove", "{bank}", "nope"], "has no task 'nope'"),
    (["add", "{bank}", "colours_tinted", "{single}"], "already has a task 'colours_tinted'"),
    (["add", "{bank}", "bad-name", "{single}"], "is not an identifier"),
    (["add", "{bank}", "fine", "{bank}/missing"], "not found"),
])
def test_bank_cli_refuses_bad_input_in_one_line(demo_bank_export, demo_export, tmp_path, capsys, argv_tail, message):
    bank_dir = copy_tree(demo_bank_export / "onnx", tmp_path / "bank")
    before = _hashes(bank_dir)
    argv = [part.format(bank=bank_dir, single=demo_export[1].export_dir) for part in argv_tail]
    assert main(["bank", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _hashes(bank_dir) == before  # the bank is intact


def test_a_head_for_another_backbone_is_refused(demo_bank_export, tmp_path):
    bank_dir = copy_tree(demo_bank_export / "onnx", tmp_path / "bank")
    before = _hashes(bank_dir)
    head, artifact = make_head_and_adapter(feature_dim=32, width=24, num_classes=4)  # 32-dim features, not 96
    export_head(head, artifact, torch.randn(6, 32), tmp_path / "foreign", log=lambda _: None)
    with pytest.raises(InputError, match="reads 32-dim features"):
        add_task(bank_dir, "foreign", tmp_path / "foreign", log=lambda _: None)
    # same width, other weights: the model identity differs
    own = read_head(bank_dir / "heads" / "colours_tinted")
    manifest = json.loads((bank_dir / "heads" / "colours_tinted" / "manifest.json").read_text())
    manifest["target_model"] = {**manifest["target_model"], "name": "ViT-B-16"}
    other = copy_tree(own.directory, tmp_path / "other")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="built for ViT-B-16"):
        add_task(bank_dir, "other", other, log=lambda _: None)
    assert _hashes(bank_dir) == before


@pytest.mark.parametrize("victim", ["backbone.onnx", "heads/textures_foggy/head.safetensors",
                                    "heads/textures_foggy/manifest.json", "model_fp16.onnx"])
def test_a_tampered_bank_file_is_refused(demo_bank_export, tmp_path, victim):
    bank_dir = copy_tree(demo_bank_export / "onnx", tmp_path / "bank")
    path = bank_dir / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        read_bank(bank_dir)
    assert "\n" not in str(caught.value)


def test_a_tampered_bank_manifest_is_refused(demo_bank_export, tmp_path):
    bank_dir = copy_tree(demo_bank_export / "onnx", tmp_path / "bank")
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    manifest["tasks"].append(dict(manifest["tasks"][0]))
    (bank_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="listed twice"):
        read_bank(bank_dir)


def test_assembly_refuses_duplicate_and_empty_task_lists(demo_bank_export, tmp_path):
    bank = read_bank(demo_bank_export / "onnx")
    backbone = read_backbone(demo_bank_export / "backbone")
    with pytest.raises(InputError, match="given twice"):
        assemble_bank(tmp_path / "b", backbone, [bank.tasks[0], BankTask(bank.tasks[0].name, bank.tasks[1].head)])
    with pytest.raises(InputError, match="at least one task"):
        assemble_bank(tmp_path / "b", backbone, [])
    with pytest.raises(InputError, match="only task"):
        single = tmp_path / "single"
        assemble_bank(single, backbone, [bank.tasks[0]], log=lambda _: None)
        remove_task(single, bank.tasks[0].name)
    assert not (tmp_path / "b").exists()


# ---- runners on multi-output graphs -----------------------------------------------------------

def test_runners_return_every_output_and_parity_is_judged_per_output(demo_bank_export):
    from transmiter_deploy.runtimes.base import InputSpec
    from transmiter_deploy.runtimes.compare import judge_outputs
    from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner
    from transmiter_deploy.runtimes.pytorch import TorchRunner

    pixels = np.random.default_rng(1).standard_normal((4, 3, 48, 48), dtype=np.float32)
    with OnnxRuntimeRunner(demo_bank_export / "onnx" / "model.onnx") as runner:
        outputs = runner.infer_outputs(pixels)
        first = runner.infer(pixels)
    assert list(outputs) == ["logits_colours_tinted", "logits_textures_foggy"]
    assert np.array_equal(first, outputs["logits_colours_tinted"])
    assert outputs["logits_textures_foggy"].shape == (4, 6)

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return {"logits_a": x.mean(dim=(2, 3)), "logits_b": -x.mean(dim=(2, 3))}

    with TorchRunner(TwoOutputs(), input_spec=InputSpec("pixel_values", (None, 3, 48, 48))) as torch_runner:
        named = torch_runner.infer_outputs(pixels)
        assert list(named) == ["logits_a", "logits_b"] and np.allclose(named["logits_b"], -named["logits_a"])
        rows = judge_outputs("pytorch-cpu", {**named, "logits_c": named["logits_a"]}, torch_runner,
                             {"logits_a": named["logits_a"], "logits_b": named["logits_a"]}, len(pixels))
    by_output = {row["output"]: row for row in rows}
    assert by_output["logits_a"]["passed"] and by_output["logits_a"]["max_abs"] == 0.0
    assert not by_output["logits_b"]["passed"]  # wrong values fail their own row
    assert not by_output["logits_c"]["passed"] and "no output 'logits_c'" in by_output["logits_c"]["error"]


def test_a_softmax_bank_has_logits_and_probabilities_per_task(demo_bank_export, tmp_path):
    bank = read_bank(demo_bank_export / "onnx")
    softmax_bank = assemble_bank(tmp_path / "bank", read_backbone(demo_bank_export / "backbone"), bank.tasks,
                                 softmax=True, log=lambda _: None)
    assert softmax_bank.manifest["tasks"][0]["probabilities"] == "probs_colours_tinted"
    session = ort.InferenceSession(str(tmp_path / "bank" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits_colours_tinted", "probs_colours_tinted", "logits_textures_foggy", "probs_textures_foggy"]
    pixels = np.random.default_rng(2).standard_normal((3, 3, 48, 48), dtype=np.float32)
    outputs = dict(zip(names, session.run(None, {"pixel_values": pixels})))
    for task in ("colours_tinted", "textures_foggy"):
        logits = outputs[f"logits_{task}"]
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        assert np.allclose(outputs[f"probs_{task}"], expected / expected.sum(axis=1, keepdims=True), atol=1e-6)


def test_a_banks_report_names_the_stand_in_tokenizer_of_each_tasks_heads(tmp_path, monkeypatch):
    """A random-weight target whose own tokenizer is not at hand (a SigLIP without transformers)
    gets a stand-in tokenizer, and the bank's report says so per task, as a single export's does.
    Once its own tokenizer can be built, a re-run makes that head again (its step keys on the
    stand-in) and the note is gone."""
    text = """\
name: stand-in-bank
source: {name: TM-Tiny-ViT, init_seed: 0}
target: {name: TM-Tiny-SigLIP, init_seed: 2}
data: {train_per_class: 4, test_per_class: 2}
head: {logit_width: 32}
extraction: {epochs: 1}
plus: {enabled: false}
tasks:
  - name: colours
    finetuned: {name: TM-Tiny-ViT, init_seed: 1}
    data: {demo_task: colours-tinted}
export: {precisions: [fp32], batch: {min: 1, opt: 2, max: 4}}
runtimes: [onnxruntime]
"""
    try:
        import transformers  # noqa: F401
    except ImportError:  # the project does not install it: the stand-in is used and recorded
        pass
    else:
        pytest.skip("transformers is installed: the SigLIP tokenizer is its own, no stand-in")
    from transmiter_deploy.pipeline.bank_export import run_bank_export

    outcome = run_bank_export(load_recipe(_write(tmp_path, text)), tmp_path / "out", progress=False,
                              log=lambda _: None)
    assert set(outcome.stand_in_tokenizers) == {"colours target"}
    assert "stand-in tokenizer" in outcome.stand_in_tokenizers["colours target"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Note: the colours target head's class names were tokenized by a stand-in tokenizer" in report
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stand_in_tokenizers"] == outcome.stand_in_tokenizers
    # transformers installed since: open_clip now builds the model's own tokenizer (one of the
    # model's vocabulary and context, like SigLIP's)
    import open_clip

    from transmiter_deploy.features.models import StandInTokenizer

    text_cfg = open_clip.get_model_config("TM-Tiny-SigLIP")["text_cfg"]
    own = StandInTokenizer(text_cfg["vocab_size"], text_cfg["context_length"])
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **_: own)
    again = run_bank_export(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", progress=False,
                            log=lambda _: None)
    ran = {step.name for step in again.steps if step.status == "ran"}
    assert "colours.head-target" in ran and "colours.head-source" not in ran
    assert again.stand_in_tokenizers == {} and "Note:" not in (tmp_path / "out" / "report.md").read_text()
