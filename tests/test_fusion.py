import pytest
import torch

from transmiter_deploy.errors import InputError
from transmiter_deploy.deploy.fusion import DeployedClassifier, FoldedHead, UnfoldedHead
from transmiter_deploy.features.models import ModelIdentity, ModelSpec, load_model

from conftest import make_head_and_adapter


def unit_features(n: int, d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g) + 0.2, dim=1)


@pytest.mark.parametrize("latent_dim, mode", [(None, "norm"), (None, "gram"), (96, "gram")])
def test_folded_head_equals_unfolded_reference(latent_dim, mode):
    head, artifact = make_head_and_adapter(feature_dim=64, width=128, num_classes=10, latent_dim=latent_dim)
    folded, unfolded = FoldedHead(head, artifact, sigma_mode=mode), UnfoldedHead(head, artifact)
    assert folded.sigma_mode == mode
    features = unit_features(256, 64)
    with torch.no_grad():
        a, b = folded(features), unfolded(features)
    assert a.shape == (256, 10)
    reference = b.abs().max()
    assert float((a - b).abs().max()) <= 1e-5 * float(reference) + 1e-5
    # the adapter really changes the logits (the test is not comparing two identities)
    assert float((b - features @ head.weight[:10].T).abs().max()) > 0.1


def test_folded_head_matches_in_float64_to_rounding():
    head, artifact = make_head_and_adapter(feature_dim=32, width=64, num_classes=5)
    head.weight = head.weight.double()
    artifact.adapter.double()
    # Gram form: algebraically exact. (The norm shortcut is exact only up to the
    # basis' own orthogonality error, about 1e-8 for a basis stored in fp32.)
    folded, unfolded = FoldedHead(head, artifact, sigma_mode="gram"), UnfoldedHead(head, artifact)
    assert folded.push.dtype == torch.float64
    features = unit_features(64, 32).double()
    with torch.no_grad():
        assert float((folded(features) - unfolded(features)).abs().max()) <= 1e-9


def test_auto_sigma_mode_and_refusals():
    head, artifact = make_head_and_adapter(feature_dim=16, width=32, num_classes=4, latent_dim=16)
    assert FoldedHead(head, artifact).sigma_mode == "gram"
    with pytest.raises(InputError, match="square orthogonal basis"):
        FoldedHead(head, artifact, sigma_mode="norm")
    with pytest.raises(InputError, match="sigma mode"):
        FoldedHead(head, artifact, sigma_mode="exact")
    other = ModelIdentity("TM-Tiny-ViT", init_seed=5)
    head.model = other
    with pytest.raises(InputError, match="adapter applies to TM-Tiny-ViT"):
        FoldedHead(head, artifact)


def test_non_orthogonal_square_basis_falls_back_to_gram():
    head, artifact = make_head_and_adapter(feature_dim=16, width=32, num_classes=4)
    with torch.no_grad():
        artifact.adapter.basis.mul_(1.01)  # as after TransMiter+ with a free basis
    folded, unfolded = FoldedHead(head, artifact), UnfoldedHead(head, artifact)
    assert folded.sigma_mode == "gram"
    features = unit_features(32, 16)
    with torch.no_grad():
        assert float((folded(features) - unfolded(features)).abs().max()) <= 1e-3


def test_class_list_mismatch_is_refused():
    head, artifact = make_head_and_adapter(feature_dim=16, width=32, num_classes=4)
    head.auxiliary_names = list(reversed(head.auxiliary_names))
    with pytest.raises(InputError, match="class list"):
        UnfoldedHead(head, artifact)


@pytest.mark.parametrize("name", ["TM-Tiny-ViT", "TM-Tiny-RN"])
def test_deployed_classifier_on_vit_and_resnet_towers(name):
    model = load_model(ModelSpec(name, init_seed=0))
    d = model.model.visual.output_dim
    head, artifact = make_head_and_adapter(feature_dim=d, width=64, num_classes=6, model=model)
    fused = DeployedClassifier(model.model.visual, FoldedHead(head, artifact))
    reference = DeployedClassifier(model.model.visual, UnfoldedHead(head, artifact), softmax=True)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = fused(pixels)
        probabilities = reference(pixels)
        expected = artifact.adapter.task_logits(head.logits(model.encode_images(pixels)))
    assert logits.shape == (4, 6)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.allclose(probabilities, expected.softmax(-1), atol=1e-5)
