"""The demo world's renderer, tasks and tokenizer (no trained weights needed)."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from transmiter_deploy.demo.tasks import TASKS, auxiliary_phrases, demo_words, get_task, write_split
from transmiter_deploy.demo.tokenizer import CONTEXT_LENGTH, demo_tokenizer
from transmiter_deploy.demo.world import STYLES, render, sample_scene
from transmiter_deploy.errors import InputError
from transmiter_deploy.models import ModelSpec, load_model


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
    sketch = np.asarray(render(scene.__class__(**{**scene.__dict__, "style": "sketch"}))).astype(float)
    dim = np.asarray(render(scene.__class__(**{**scene.__dict__, "style": "dim"}))).astype(float)
    assert np.abs(photo - sketch).mean() > 5 and dim.mean() < photo.mean()


def test_task_splits_are_balanced_disjoint_and_seeded(tmp_path):
    task = get_task("shapes-sketch")
    test = task.scenes("test", 3)
    assert [label for _, label in test[:8]] == list(range(8))
    assert all(scene.style == "sketch" and scene.shape == task.classes[label] for scene, label in test)
    train_seeds = {scene.seed for scene, _ in task.scenes("train", 20)}
    assert not train_seeds & {scene.seed for scene, _ in test}
    assert task.scenes("test", 3) == test
    finetune = task.scenes("finetune", 2, base_only=True)
    assert {label for _, label in finetune} == set(range(task.num_base))
    write_split(task, "test", tmp_path / "test", per_class=2)
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(task.classes)
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
    assert len(demo_words()) < 60


def test_demo_configs_fit_the_tokenizer():
    directory = resources.files("transmiter_deploy").joinpath("model_configs")
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
    from transmiter_deploy.demo.train import FinetuneSettings, PretrainSettings, finetune, pretrain, pretraining_set, save_weights

    scenes, images = pretraining_set(64, seed=0)
    task = get_task("shapes-sketch")
    for name in ("TM-Demo-Source", "TM-Demo-Target"):
        model = load_model(ModelSpec(name))
        stats = pretrain(model, scenes, images, PretrainSettings(seconds=0.5, batch_size=16, warmup_steps=1), log=lambda _: None)
        assert stats["steps"] >= 1 and np.isfinite(stats["final_loss"])
        save_weights(model, tmp_path / f"{name}.safetensors")
        if name == "TM-Demo-Source":
            tuned = finetune(model, task, FinetuneSettings(per_class=2, epochs=1), log=lambda _: None)
            assert not torch.equal(tuned.model.visual.conv1.weight, model.model.visual.conv1.weight)
            save_weights(tuned, tmp_path / f"TM-Demo-Source-ft-{task.name}.safetensors")
    settings = ExperimentSettings(train_per_class=4, test_per_class=2, shots=2, logit_width=32,
                                  extraction_epochs=1, plus_epochs=1)
    rows = run_task(task, tmp_path, tmp_path / "work", settings)
    assert [r["model"] for r in rows] == ["source zero-shot", "source fine-tuned", "target zero-shot",
                                          "target + TransMiter", "target + TransMiter+"]
    assert all(0 <= r["base"] <= 100 and 0 <= r["novel"] <= 100 for r in rows)
