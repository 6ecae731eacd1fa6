import pytest
import torch

from transmiter_deploy.method.adapter import (
    AdapterConfig,
    TransMiterAdapter,
    check_logits,
    constrain_orthogonal,
    release_orthogonal,
    standardise,
)
from transmiter_deploy.errors import InputError

from conftest import clip_like_logits


def test_identity_at_initialisation_reference_size():
    # Reference configuration (C = D = 1024) on CLIP-scale logits (100 * cosine).
    logits, _, _ = clip_like_logits(256, 1024, feature_dim=512, scale=100.0)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=100))
    with torch.no_grad():
        out = adapter(logits)
    # Exact up to float32 rounding of the 1024-wide push and pull: a few ulps of the largest
    # logit (an absolute 1e-5 held on one CPU and not on another, at 1.3e-5 for |logits| ~ 22).
    assert float((out - logits).abs().max()) <= 16 * torch.finfo(torch.float32).eps * float(logits.abs().max())


def test_identity_holds_with_several_layers_and_task_slice():
    logits, _, _ = clip_like_logits(64, 128)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=10, logit_width=128, latent_dim=128, num_layers=3))
    with torch.no_grad():
        task = adapter.task_logits(logits)
    assert task.shape == (64, 10)
    assert float((task - logits[:, :10]).abs().max()) <= 1e-5


def test_narrow_latent_is_a_projection_not_identity():
    # With D < C the pull(push(.)) is an orthogonal projection: idempotent, not the identity.
    logits, _, _ = clip_like_logits(16, 64)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=8, logit_width=64, latent_dim=32))
    assert adapter.orthogonality_error() < 1e-6
    basis = adapter.basis.detach()
    projector = basis.T @ basis
    assert torch.allclose(projector @ projector, projector, atol=1e-5)
    with torch.no_grad():
        assert float((adapter(logits) - logits).abs().max()) > 1e-2


def test_standardise_uses_unbiased_std():
    logits = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    s, mu, sigma = standardise(logits, eps=0.0)
    assert float(mu) == pytest.approx(3.0)
    assert float(sigma) == pytest.approx((14.0 / 3.0) ** 0.5)
    assert torch.allclose(s.std(dim=1, unbiased=True), torch.ones(1))


def test_mlp_last_layer_starts_at_zero_and_same_seed_same_weights():
    config = AdapterConfig(num_task_classes=4, logit_width=32, latent_dim=32)
    first, second, other = TransMiterAdapter(config, seed=3), TransMiterAdapter(config, seed=3), TransMiterAdapter(config, seed=4)
    assert torch.count_nonzero(first.blocks[0].fc2.weight) == 0
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.basis, other.basis)


def test_orthogonal_constraint_round_trip_keeps_basis():
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=4, logit_width=48, latent_dim=48))
    before = adapter.basis.detach().clone()
    constrain_orthogonal(adapter, "cayley")
    assert torch.allclose(adapter.basis, before, atol=1e-5)
    release_orthogonal(adapter)
    assert isinstance(adapter.basis, torch.nn.Parameter)
    assert adapter.orthogonality_error() <= 1e-5


def test_qr_retraction_restores_orthogonality_and_fixes_orthogonal_bases():
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=4, logit_width=64, latent_dim=32))
    before = adapter.basis.detach().clone()
    hook = constrain_orthogonal(adapter, "qr")
    assert torch.allclose(adapter.basis, before, atol=1e-5)  # already orthogonal: unchanged
    with torch.no_grad():
        adapter.basis.add_(0.01 * torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))
    assert adapter.orthogonality_error() > 1e-3
    hook()
    assert adapter.orthogonality_error() <= 1e-5
    # the result is the Q of W^T = QR with positive diag(R): compare with Householder QR
    perturbed = before + 0.01 * torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q, r = torch.linalg.qr(perturbed.T.double())
    assert torch.allclose(adapter.basis.double(), (q * torch.sign(torch.diagonal(r))).T, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_task_classes": 0}, "num_task_classes"),
        ({"num_task_classes": 20, "logit_width": 10, "latent_dim": 10}, "do not fit"),
        ({"num_task_classes": 2, "logit_width": 10, "latent_dim": 20}, "latent_dim"),
        ({"num_task_classes": 2, "logit_width": 10, "latent_dim": 10, "eps": 0.0}, "eps"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        AdapterConfig(**kwargs)


def test_check_logits_refuses_constant_nan_and_wrong_width():
    good, _, _ = clip_like_logits(4, 16)
    check_logits(good, 16, "x")
    constant = good.clone()
    constant[2] = 5.0
    with pytest.raises(InputError, match="constant logits"):
        check_logits(constant, 16, "x")
    nan = good.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        check_logits(nan, 16, "x")
    with pytest.raises(InputError, match="width 17"):
        check_logits(good, 17, "x")
