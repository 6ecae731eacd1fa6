"""The demo world's renderer, tasks and tokenizer (no trained weights needed)."""

import json
from dataclasses import replace
from importlib import resources

import numpy as np
import pytest
import torch

from transmiter_deploy.demo.tasks import TASKS, auxiliary_phrases, demo_words, get_task, write_split
from transmiter_deploy.demo.tokenizer import CONTEXT_LENGTH, DEMO_WORDS, demo_tokenizer
from transmiter_deploy.demo.weights import finetuned_name, verify_weights, write_weights_manifest
from transmiter_deploy.demo.zero_shot import reference_accuracy
from transmiter_deploy.demo.world import STYLES, render, sample_scene
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.models import ModelSpec, load_model


def test_rendering_is_deterministic_per_scene():
    first = [render(sample_scene(np.random.default_rng(5), style)) for style in STYLES]
    again = [render(sample_scene(np.random.default_rng(5), style)) for style in STYLES]
    for a, b in zip(first, again):
        assert a.size == (48, 48) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_styles_change_the_image_of_the_same_scene():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "photo", shape="star", colour="red", texture="solid", size="large", background="white")
    photo = np.asarray(render(scene)).astype(float)
    styled = {style: np.asarray(render(replace(scene, style=style))).astype(float) for style in STYLES}
    assert np.abs(photo - styled["sketch"]).mean() > 5
    assert styled["dim"].mean() < photo.mean() and styled["dusk"].mean() < photo.mean()
    assert styled["foggy"].std() < 0.7 * photo.std()  # fog flattens contrast
    # the white-balance fault turns the (solid, centred) red object's hue towards orange
    centred = replace(scene, x=0.5, y=0.5)
    hues = [np.asarray(render(replace(centred, style=style)).convert("HSV"))[20:28, 20:28, 0].astype(int)
            for style in ("photo", "tinted")]
    shift = (hues[1] - hues[0] + 128) % 256 - 128  # hue is circular; red sits at 0
    assert 8 <= shift.mean() <= 16


def test_task_splits_are_balanced_disjoint_and_seeded(tmp_path):
    task = get_task("colours-tinted")
    test = task.scenes("test", 3)
    assert [label for _, label in test[:8]] == list(range(8))
    assert all(scene.style == "tinted" and scene.colour == task.classes[label] for scene, label in test)
    train_seeds = {scene.seed for scene, _ in task.scenes("train", 20)}
    assert not train_seeds & {scene.seed for scene, _ in test}
    assert task.scenes("test", 3) == test
    finetune = task.scenes("finetune", 2, base_only=True)
    assert {label for _, label in finetune} == set(range(task.num_base))
    write_split(task, "test", tmp_path / "test", per_class=2)
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(task.classes)
    write_split(task, "train", tmp_path / "train", per_class=2, base_only=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(task.classes[: task.num_base])
    with pytest.raises(InputError, match="unknown split"):
        task.scenes("validation", 1)
    with pytest.raises(InputError, match="unknown demo task"):
        get_task("cars")


def test_tokenizer_puts_end_of_text_at_the_largest_id_and_covers_every_prompt():
    tokenizer = demo_tokenizer()
    ids = tokenizer(["a sketch of a red star", "a small blue ring"])
    assert ids.shape == (2, CONTEXT_LENGTH)
    eot = tokenizer.vocab_size - 1
    assert (ids.argmax(dim=1) == (ids != 0).sum(dim=1) - 1).all()  # argmax pooling lands on EOT
    assert int(ids.max()) == eot
    unk = tokenizer.index["<unk>"]
    prompts = [t.format(c) for task in TASKS.values() for t in task.templates for c in task.classes]
    prompts += [sample_scene(np.random.default_rng(i)).caption(i) for i in range(50)]
    prompts += auxiliary_phrases()
    assert unk not in tokenizer(prompts)
    assert set(demo_words()) <= set(DEMO_WORDS)  # the frozen vocabulary covers the world


def test_demo_configs_fit_the_tokenizer():
    directory = resources.files("transmiter_deploy").joinpath("demo", "model_configs")
    for name in ("TM-Demo-Source", "TM-Demo-Target"):
        config = json.loads(directory.joinpath(f"{name}.json").read_text())
        assert demo_tokenizer().vocab_size <= config["text_cfg"]["vocab_size"]
        assert config["text_cfg"]["context_length"] == CONTEXT_LENGTH
        model = load_model(ModelSpec(name))
        features = model.encode_texts(["a sketch of a star", "a red circle"])
        assert features.shape[0] == 2 and torch.isfinite(features).all()


def test_training_and_experiment_pipeline_smoke(tmp_path):
    # Seconds of training: this checks the code path end to end (pretraining,
    # fine-tuning, fp16 weights, then cache -> heads -> extract -> transfer ->
    # TransMiter+ -> evaluate on the rendered task), not the accuracy.
    from transmiter_deploy.demo.experiment import ExperimentSettings, run_task
    from transmiter_deploy.demo.train import (
        FinetuneSettings,
        PretrainSettings,
        finetune,
        pretrain,
        pretraining_set,
        save_weights,
    )

    scenes, images = pretraining_set(64, seed=0)
    task = get_task("textures-foggy")
    for name in ("TM-Demo-Source", "TM-Demo-Target"):
        model = load_model(ModelSpec(name))
        stats = pretrain(model, scenes, images, PretrainSettings(steps=2, batch_size=16, warmup_steps=1), log=lambda _: None)
        assert stats["steps"] == 2 and np.isfinite(stats["final_loss"])
        save_weights(model, tmp_path / f"{name}.safetensors")
        if name == "TM-Demo-Source":
            full = finetune(model, task, FinetuneSettings(per_class=2, epochs=1, weight_mix=1.0), log=lambda _: None)
            tuned = finetune(model, task, FinetuneSettings(per_class=2, epochs=1, weight_mix=0.4), log=lambda _: None)
            start, end = model.model.visual.conv1.weight, full.model.visual.conv1.weight
            assert not torch.equal(start, end)
            # WiSE-FT: the teacher sits 40% of the way from the zero-shot to the fine-tuned weights
            torch.testing.assert_close(tuned.model.visual.conv1.weight, start + 0.4 * (end - start))
            save_weights(tuned, tmp_path / f"{finetuned_name(task.name)}.safetensors")
    write_weights_manifest(tmp_path, [task.name], reference_accuracy(tmp_path, [task]))
    manifest = verify_weights(tmp_path)
    assert manifest["tasks"] == [task.name]
    assert set(manifest["reference_accuracy"][task.name]) == {"source", "target"}
    settings = ExperimentSettings(train_per_class=4, test_per_class=2, shots=2, logit_width=32,
                                  extraction_epochs=1, plus_epochs=1)
    rows = run_task(task, tmp_path, tmp_path / "work", settings)
    assert [r["model"] for r in rows] == ["source zero-shot", "source fine-tuned", "target zero-shot",
                                          "target + TransMiter", "target + TransMiter+", "target + EFT"]
    assert all(0 <= r["base"] <= 100 and 0 <= r["novel"] <= 100 for r in rows)

    weights = tmp_path / f"{finetuned_name(task.name)}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        verify_weights(tmp_path)
    with pytest.raises(InputError, match="make demo-weights"):
        verify_weights(tmp_path / "nowhere")
