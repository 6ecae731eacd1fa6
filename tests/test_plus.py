import pytest
import torch
import torch.nn.functional as F

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.errors import InputError
from transmiter_deploy.method.plus import PlusSettings, few_shot_indices, train_plus

from conftest import clip_like_logits

K, C = 6, 48


@pytest.fixture(scope="module")
def labelled():
    logits, _, _ = clip_like_logits(600, C, seed=11)
    # Planted labels that zero-shot gets wrong: the zero-shot argmax, relabelled
    # by a fixed derangement of the task classes.
    relabel = torch.tensor([1, 2, 3, 4, 5, 0])
    labels = relabel[logits[:, :K].argmax(dim=1)]
    return logits, labels


def accuracy(adapter, logits, labels):
    with torch.no_grad():
        return float((adapter.task_logits(logits).argmax(1) == labels).float().mean())


def test_plus_learns_from_labels_and_keeps_basis_orthogonal(labelled):
    logits, labels = labelled
    start = TransMiterAdapter(AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C))
    settings = PlusSettings(epochs=15, lr=1e-3, batch_size=32)
    refined, history = train_plus(start, logits[:400], labels[:400], settings, progress=False)
    assert history[-1] < 0.5 * history[0]
    assert accuracy(refined, logits[400:], labels[400:]) > accuracy(start, logits[400:], labels[400:]) + 0.3
    assert refined.orthogonality_error() <= 1e-4
    # the input adapter is not modified
    assert torch.count_nonzero(start.blocks[0].fc2.weight) == 0


def test_free_basis_leaves_the_orthogonal_group(labelled):
    logits, labels = labelled
    start = TransMiterAdapter(AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C))
    refined, _ = train_plus(start, logits, labels, PlusSettings(epochs=5, lr=1e-2, keep_orthogonal=False), progress=False)
    assert refined.orthogonality_error() > 1e-3


def test_plus_ignores_unlabelled_rows_and_refuses_no_labels(labelled):
    logits, labels = labelled
    start = TransMiterAdapter(AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C))
    with pytest.raises(InputError, match="labelled"):
        train_plus(start, logits[:10], torch.full((10,), -1), PlusSettings(epochs=1), progress=False)
    with pytest.raises(InputError, match="below"):
        train_plus(start, logits[:10], torch.full((10,), K), PlusSettings(epochs=1), progress=False)


def test_few_shot_indices_are_seeded_and_per_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, -1, 0, 1, 2, 2, 2])
    picked = few_shot_indices(labels, shots=2, seed=0, num_classes=3)
    counts = torch.bincount(labels[picked], minlength=3)
    assert counts.tolist() == [2, 2, 2]
    assert torch.equal(picked, few_shot_indices(labels, shots=2, seed=0, num_classes=3))
    assert (labels[few_shot_indices(labels, shots=10, seed=1)] >= 0).all()
    assert len(few_shot_indices(labels, shots=10, seed=1)) == 11


def test_plus_loss_is_cross_entropy_on_task_logits(labelled):
    logits, labels = labelled
    start = TransMiterAdapter(AdapterConfig(num_task_classes=K, logit_width=C, latent_dim=C))
    _, history = train_plus(start, logits[:32], labels[:32], PlusSettings(epochs=1, lr=1e-12, batch_size=32), progress=False)
    expected = float(F.cross_entropy(logits[:32, :K], labels[:32]))
    assert history[0] == pytest.approx(expected, rel=1e-4)
