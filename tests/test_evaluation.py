import pytest
import torch

from transmiter_deploy.errors import InputError
from transmiter_deploy.method.evaluation import base_to_novel, harmonic_mean, num_base_classes


def test_hand_computed_base_to_novel():
    # 4 classes: base = {0, 1}, novel = {2, 3}.
    logits = torch.tensor(
        [
            [5.0, 1.0, 9.0, 0.0],  # label 0: over base only -> 0 (right), although class 2 is global max
            [2.0, 1.0, 0.0, 0.0],  # label 1: -> 0 (wrong)
            [0.0, 3.0, 0.0, 0.0],  # label 1: -> 1 (right)
            [9.0, 0.0, 1.0, 2.0],  # label 3: over novel only -> 3 (right)
            [0.0, 0.0, 4.0, 1.0],  # label 3: -> 2 (wrong)
            [0.0, 0.0, 4.0, 1.0],  # label 2: -> 2 (right)
            [0.0, 0.0, 0.0, 1.0],  # label 2: -> 3 (wrong)
            [1.0, 1.0, 1.0, 1.0],  # unlabelled: ignored
        ]
    )
    labels = torch.tensor([0, 1, 1, 3, 3, 2, 2, -1])
    result = base_to_novel(logits, labels)
    assert result["num_base_classes"] == 2
    assert result["base"] == pytest.approx(200 / 3)
    assert result["novel"] == pytest.approx(50.0)
    assert result["hm"] == pytest.approx(2 * (200 / 3) * 50 / (200 / 3 + 50))
    # over all 4 classes: rows 0 -> 2 (wrong), 1 wrong, 2 right, 3 -> 0 wrong, 4 wrong, 5 right, 6 wrong
    assert result["all"] == pytest.approx(200 / 7)
    assert (result["num_base_samples"], result["num_novel_samples"]) == (3, 4)


def test_odd_class_count_puts_extra_class_in_base_and_explicit_split():
    assert num_base_classes(5) == 3
    logits = torch.eye(5)
    labels = torch.arange(5)
    assert base_to_novel(logits, labels)["num_base_classes"] == 3
    assert base_to_novel(logits, labels, num_base=1)["num_base_samples"] == 1


def test_harmonic_mean_edges_and_bad_input():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(None, 50.0) is None
    with pytest.raises(InputError):
        base_to_novel(torch.zeros(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(InputError):
        base_to_novel(torch.zeros(3, 4), torch.tensor([0, 1, 2]), num_base=5)
