import pytest
import torch

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.errors import InputError
from transmiter_deploy.method.extraction import (
    ExtractionSettings,
    add_logit_noise,
    distillation_loss,
    extract,
    mean_distillation_loss,
)

from conftest import clip_like_logits

K, C = 8, 64


@pytest.fixture(scope="module")
def planted():
    """Source logits and a planted fine-tuned teacher: task classes permuted and sharpened."""
    logits, _, _ = clip_like_logits(3000, C, seed=0)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    teacher = 1.5 * logits[:, perm]
    return logits, teacher


@pytest.fixture(scope="module")
def extracted(planted):
    logits, teacher = planted
    config = AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C)
    settings = ExtractionSettings(epochs=10, batch_size=64, seed=0)
    adapter, history = extract(logits[:2000], teacher[:2000], config, settings, progress=False)
    return adapter, history, config, settings


def test_extraction_halves_held_out_kl(planted, extracted):
    logits, teacher = planted
    adapter, history, config, _ = extracted
    before = mean_distillation_loss(TransMiterAdapter(config), logits[2000:], teacher[2000:])
    after = mean_distillation_loss(adapter, logits[2000:], teacher[2000:])
    assert after <= 0.5 * before, (before, after)
    assert history[-1] < history[0]


def test_basis_stays_orthogonal_after_extraction(extracted):
    adapter = extracted[0]
    assert adapter.orthogonality_error() <= 1e-4
    # and training did move it (the constraint is not a frozen basis)
    assert not torch.equal(adapter.basis, TransMiterAdapter(adapter.config).basis)


def test_cayley_parametrisation_path_also_keeps_basis_orthogonal(planted):
    logits, teacher = planted
    config = AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C)
    settings = ExtractionSettings(epochs=3, batch_size=64, orthogonal_map="cayley")
    adapter, history = extract(logits[:1000], teacher[:1000], config, settings, progress=False)
    assert adapter.orthogonality_error() <= 1e-4
    assert isinstance(adapter.basis, torch.nn.Parameter)  # parametrisation removed before returning
    assert history[-1] < history[0]


def test_qr_retraction_matches_cayley_parametrisation_quality(planted, extracted):
    # The default (QR retraction) and the reference's parametrisation (Cayley)
    # must learn equally well: compare held-out loss after the same training.
    logits, teacher = planted
    qr_adapter, _, config, settings = extracted
    assert settings.orthogonal_map == "qr"
    cayley_adapter, _ = extract(logits[:2000], teacher[:2000], config,
                                ExtractionSettings(epochs=10, batch_size=64, seed=0, orthogonal_map="cayley"),
                                progress=False)
    qr_loss = mean_distillation_loss(qr_adapter, logits[2000:], teacher[2000:])
    cayley_loss = mean_distillation_loss(cayley_adapter, logits[2000:], teacher[2000:])
    assert qr_loss <= 1.25 * cayley_loss and cayley_loss <= 1.25 * qr_loss, (qr_loss, cayley_loss)


def test_same_seed_gives_bit_identical_adapters(planted):
    logits, teacher = planted
    config = AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C)
    settings = ExtractionSettings(epochs=2, batch_size=64, seed=7)
    first, h1 = extract(logits[:500], teacher[:500], config, settings, progress=False)
    second, h2 = extract(logits[:500], teacher[:500], config, settings, progress=False)
    assert h1 == h2
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    third, _ = extract(logits[:500], teacher[:500], config, ExtractionSettings(epochs=2, batch_size=64, seed=8), progress=False)
    assert not torch.equal(first.basis, third.basis)


def test_distillation_loss_matches_definition():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    tau = 0.5
    p = torch.softmax(teacher / tau, dim=1)
    q = torch.softmax(student, dim=1)
    expected = tau * (p * (p.log() - q.log())).sum(dim=1).mean()
    assert float(distillation_loss(student, teacher, tau)) == pytest.approx(float(expected), rel=1e-6)
    assert float(distillation_loss(teacher / tau, teacher, tau)) == pytest.approx(0.0, abs=1e-6)


def test_noise_hits_about_half_the_samples_with_scaled_std():
    logits, _, _ = clip_like_logits(4000, 256, seed=3)
    noisy = add_logit_noise(logits, 0.5, 0.5, torch.Generator().manual_seed(0))
    changed = (noisy != logits).any(dim=1)
    assert 0.45 < float(changed.float().mean()) < 0.55
    ratio = (noisy - logits)[changed].std(dim=1) / logits[changed].std(dim=1)
    assert float(ratio.mean()) == pytest.approx(0.5, rel=0.05)


def test_extraction_refuses_bad_inputs(planted):
    logits, teacher = planted
    config = AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C)
    with pytest.raises(InputError, match="teacher logits must have shape"):
        extract(logits[:10], teacher[:9], config, ExtractionSettings(epochs=1), progress=False)
    flat = logits[:10].clone()
    flat[0] = 1.0
    with pytest.raises(InputError, match="constant logits"):
        extract(flat, teacher[:10], config, ExtractionSettings(epochs=1), progress=False)
    with pytest.raises(InputError, match="epochs"):
        extract(logits[:10], teacher[:10], config, ExtractionSettings(epochs=0), progress=False)
