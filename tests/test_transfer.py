import pytest
import torch

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter, standardise
from transmiter_deploy.errors import InputError
from transmiter_deploy.method.transfer import procrustes_rotation, transfer

from conftest import clip_like_logits


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_procrustes_recovers_planted_rotation():
    generator = torch.Generator().manual_seed(0)
    z_source = torch.randn(2000, 64, generator=generator, dtype=torch.float64)
    q0 = random_rotation(64, seed=1)
    z_target = z_source @ q0.T + 1e-3 * torch.randn(2000, 64, generator=generator, dtype=torch.float64)
    q = procrustes_rotation(z_target, z_source, regularisation=0.0)
    assert float((q - q0).abs().max()) <= 1e-3
    assert float((q @ q.T - torch.eye(64, dtype=torch.float64)).abs().max()) <= 1e-10


def test_large_lambda_pulls_rotation_towards_identity():
    generator = torch.Generator().manual_seed(0)
    z_source = torch.randn(500, 32, generator=generator, dtype=torch.float64)
    z_target = z_source @ random_rotation(32, seed=2).T
    eye = torch.eye(32, dtype=torch.float64)
    distances = [float((procrustes_rotation(z_target, z_source, lam) - eye).norm()) for lam in (0.0, 1e3, 1e6)]
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.05


def test_transfer_moves_basis_so_target_latents_land_on_source_latents():
    # Plant: target logits are the source's with classes mixed by a rotation that
    # commutes with standardisation (an orthogonal map fixing the all-ones vector).
    width = 48
    source, _, _ = clip_like_logits(3000, width, seed=0)
    generator = torch.Generator().manual_seed(5)
    basis_ones = torch.full((width, 1), width ** -0.5)
    complement = torch.linalg.qr(torch.cat([basis_ones, torch.randn(width, width - 1, generator=generator)], dim=1))[0][:, 1:]
    small = random_rotation(width - 1, seed=6).float()
    mixing = basis_ones @ basis_ones.T + complement @ small @ complement.T
    target = source @ mixing.T
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=6, logit_width=width, latent_dim=width), seed=0)
    result = transfer(adapter, source, target, regularisation=0.0)
    moved = result.adapter
    assert moved.orthogonality_error() <= 1e-5
    z_source = standardise(source, 1e-6)[0] @ adapter.basis.detach().T
    z_target = standardise(target, 1e-6)[0] @ moved.basis.detach().T
    assert float((z_target - z_source).abs().max()) <= 1e-3
    # the original adapter is untouched
    assert torch.equal(adapter.basis, TransMiterAdapter(adapter.config, seed=0).basis)


def test_identical_models_give_identity_rotation():
    logits, _, _ = clip_like_logits(500, 32, seed=2)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=4, logit_width=32, latent_dim=32))
    result = transfer(adapter, logits, logits, regularisation=500.0)
    assert float((result.rotation - torch.eye(32, dtype=torch.float64)).abs().max()) <= 1e-8
    assert result.provenance()["rotation_distance"] <= 1e-8


def test_mean_mode_equals_sum_mode_with_lambda_times_n():
    source, _, _ = clip_like_logits(400, 32, seed=3)
    target, _, _ = clip_like_logits(400, 32, seed=4)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=4, logit_width=32, latent_dim=32))
    mean = transfer(adapter, source, target, regularisation=0.5, lambda_mode="mean").rotation
    total = transfer(adapter, source, target, regularisation=0.5 * 400, lambda_mode="sum").rotation
    assert float((mean - total).abs().max()) <= 1e-8


def test_transfer_refuses_mismatched_inputs():
    source, _, _ = clip_like_logits(100, 32, seed=3)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=4, logit_width=32, latent_dim=32))
    with pytest.raises(InputError, match="same images"):
        transfer(adapter, source, source[:50])
    with pytest.raises(InputError, match="width 32"):
        transfer(adapter, source, source[:, :16])
    with pytest.raises(InputError, match="lambda mode"):
        transfer(adapter, source, source, lambda_mode="median")
