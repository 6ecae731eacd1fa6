"""Where extraction and TransMiter+ train: `--device` / the recipe's `device:` (auto, cpu, cuda).

This machine has no GPU: the CPU path, the auto resolution and the error for a missing GPU are
tested; the parity test also runs on the GPU wherever torch sees one."""

from __future__ import annotations

import pytest
import torch

from transmiter_deploy.cli import main
from transmiter_deploy.errors import DependencyError, InputError
from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.method.device import resolve_device
from transmiter_deploy.method.extraction import ExtractionSettings, extract
from transmiter_deploy.method.plus import PlusSettings, train_plus
from transmiter_deploy.pipeline.recipe import RecipeError, load_recipe

from conftest import SMALL_DEMO, clip_like_logits

NO_GPU = not torch.cuda.is_available()
WIDTH, K = 48, 6


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_an_explicit_gpu_on_a_machine_without_one_is_one_line_exit_3(tmp_path, capsys):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DependencyError, match=f"device '{name}' asked for, but torch sees no CUDA GPU"):
            resolve_device(name)
    missing = str(tmp_path / "missing")  # the device is checked before any file is read
    extract_args = ["extract", "--source-cache", missing, "--source-head", missing, "--teacher-cache", missing,
                    "--teacher-head", missing, "--out", str(tmp_path / "a")]
    plus_args = ["plus", "--adapter", missing, "--cache", missing, "--head", missing, "--out", str(tmp_path / "p")]
    for args in (extract_args, plus_args):
        assert main([*args, "--device", "cuda"]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "torch sees no CUDA GPU" in err
        assert main([*args, "--device", "gpu0"]) == 2
        assert "unknown device 'gpu0'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_recipe_device_is_checked_when_read_and_resolved_when_run(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(SMALL_DEMO + "device: tpu\n")
    with pytest.raises(RecipeError, match=r"recipe \S+: device: must be auto"):
        load_recipe(path)
    path.write_text(SMALL_DEMO + "device: cpu\n")
    assert load_recipe(path).device == "cpu"
    path.write_text(SMALL_DEMO)
    assert load_recipe(path).device == "auto"
    if NO_GPU:  # a GPU asked for and missing stops the export before any step
        path.write_text(SMALL_DEMO + "device: cuda\n")
        assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "torch sees no CUDA GPU" in err
        assert not (tmp_path / "out" / "steps").exists() and not (tmp_path / "out" / "caches").exists()


def test_training_on_the_auto_device_matches_the_cpu_and_returns_cpu_weights():
    """Here auto is the CPU (the same numbers); on a GPU machine this is the GPU's parity test:
    the same batches and noise (a CPU generator drives both), results within float tolerance."""
    device = resolve_device("auto")
    logits, _, _ = clip_like_logits(256, WIDTH, seed=1)
    teacher = logits[:, :K] * 1.5 + 0.3 * torch.randn(256, K, generator=torch.Generator().manual_seed(2))
    config = AdapterConfig(num_task_classes=K, logit_width=WIDTH, latent_dim=WIDTH)
    settings = ExtractionSettings(epochs=2, batch_size=64, seed=3)
    on_cpu, cpu_history = extract(logits, teacher, config, settings, progress=False, device="cpu")
    on_device, device_history = extract(logits, teacher, config, settings, progress=False, device=device)
    labels = torch.arange(256) % K
    plus = PlusSettings(epochs=2, batch_size=32, seed=3)
    refined_cpu, _ = train_plus(on_cpu, logits, labels, plus, progress=False, device="cpu")
    refined_device, _ = train_plus(on_device, logits, labels, plus, progress=False, device=device)
    for model in (on_cpu, on_device, refined_cpu, refined_device):
        assert {p.device.type for p in model.state_dict().values()} == {"cpu"}
    assert cpu_history == pytest.approx(device_history, rel=1e-4, abs=1e-5)
    for first, second in ((on_cpu, on_device), (refined_cpu, refined_device)):
        for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    # and the adapter learnt something: it is no longer the identity it started as
    assert not torch.allclose(TransMiterAdapter(config, seed=3).task_logits(logits), on_cpu.task_logits(logits))
