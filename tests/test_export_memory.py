"""The export's memory estimate (deploy/export_memory.py): a machine that cannot hold an export is
refused before anything is traced, in one line with the estimate and the way out."""

import pytest

from transmiter_deploy.deploy import export_memory
from transmiter_deploy.deploy.export_memory import MEMORY_CHECK_ENV, check_export_memory, estimate
from transmiter_deploy.errors import DependencyError, InputError


def test_estimate_is_the_interpreter_plus_the_largest_phase_of_the_precisions():
    result = estimate(1_000_000_000, ("fp32", "fp16"), available=10**12)
    factors = export_memory.FACTORS
    assert result.limiting == max(("fp32", "fp16"), key=factors.get)
    assert estimate(10**9, ("fp32",), available=10**12, external_data=True).peak_bytes == (
        export_memory.EXTERNAL_BASE_BYTES + int(export_memory.FACTORS_EXTERNAL["fp32"] * 1e9))
    assert result.peak_bytes == export_memory.INTERPRETER_BYTES + int(factors[result.limiting] * 1e9)
    assert result.fits and not estimate(10**12, ("fp32",), available=10**12).fits


def test_an_export_larger_than_the_machine_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv(MEMORY_CHECK_ENV, raising=False)
    weights = export_memory.available_bytes()  # the estimate is several times the weights
    with pytest.raises(DependencyError) as refused:
        check_export_memory(weights, ("fp32", "fp16"), "the image tower of X")
    message = str(refused.value)
    assert "\n" not in message and "needs about" in message and "is available" in message
    assert MEMORY_CHECK_ENV in message and "GB" in message
    assert refused.value.exit_code == 3


def test_a_small_export_passes_and_the_check_can_be_switched_off(monkeypatch):
    monkeypatch.delenv(MEMORY_CHECK_ENV, raising=False)
    assert check_export_memory(1_000_000, ("fp32", "fp16"), "x").fits
    monkeypatch.setenv(MEMORY_CHECK_ENV, "off")
    assert not check_export_memory(10**14, ("fp32", "fp16"), "x").fits  # estimated, not refused
    monkeypatch.setenv(MEMORY_CHECK_ENV, "maybe")
    with pytest.raises(InputError, match=MEMORY_CHECK_ENV):
        check_export_memory(1_000_000, ("fp32",), "x")


def test_fp32_alone_is_offered_when_only_the_reduced_precision_does_not_fit(monkeypatch):
    monkeypatch.delenv(MEMORY_CHECK_ENV, raising=False)
    monkeypatch.setitem(export_memory.FACTORS, "fp16", export_memory.FACTORS["fp32"] * 4)
    available = export_memory.available_bytes()
    weights = int((available - export_memory.INTERPRETER_BYTES) / (export_memory.FACTORS["fp32"] * 2))
    with pytest.raises(DependencyError, match="export fp32 alone here"):
        check_export_memory(weights, ("fp32", "fp16"), "x")


@pytest.mark.parametrize("exporter", ["deployment", "bank backbone"])
def test_both_tower_exports_are_refused_before_tracing_on_a_machine_too_small(monkeypatch, tmp_path, exporter):
    import torch

    from transmiter_deploy.deploy.bank import export_backbone
    from transmiter_deploy.deploy.onnx_export import ExportSettings, export_deployment
    from transmiter_deploy.features.models import ModelSpec, load_model

    model = load_model(ModelSpec("TM-Tiny-ViT", init_seed=0))
    pixels = torch.zeros(2, 3, *model.preprocess_config["image_size"])
    monkeypatch.delenv(MEMORY_CHECK_ENV, raising=False)
    monkeypatch.setattr(export_memory, "available_bytes", lambda: 1 << 20)  # a 1 MiB machine
    with pytest.raises(DependencyError, match="the image tower of .*needs about") as refused:
        if exporter == "bank backbone":
            export_backbone(model, tmp_path / "out", pixels, ExportSettings(), log=lambda _: None)
        else:
            from transmiter_deploy.benchmark.variants import synthetic_head_and_adapter

            head, artifact = synthetic_head_and_adapter(model, 16, 4)
            export_deployment(model, head, artifact, tmp_path / "out", pixels, ExportSettings(), log=lambda _: None)
    assert refused.value.exit_code == 3 and not (tmp_path / "out").exists()
