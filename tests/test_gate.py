"""The accuracy gate of a calibrated precision (deploy/gate.py) on logits made to a chosen
accuracy: judged on base, novel and HM accuracy (points and relative to fp32), agreement a
criterion only where asked or where the images have no labels."""

import numpy as np
import pytest

from transmiter_deploy.deploy.gate import GateImages, accuracy_gate
from transmiter_deploy.runtimes.registry import precision

INT8 = precision("int8")
CLASSES, BASE = 4, 2  # classes 0-1 base, 2-3 novel


def logits_for(labels: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Logits predicting each label, except where ``wrong``: the next class of the same half."""
    predicted = labels.copy()
    predicted[wrong] = np.where(labels[wrong] < BASE, 1 - labels[wrong], 5 - labels[wrong])
    logits = np.zeros((len(labels), CLASSES), np.float32)
    logits[np.arange(len(labels)), predicted] = 1.0
    return logits


LABELS = np.repeat(np.arange(CLASSES), 250)  # 500 base images, 500 novel
IMAGES = GateImages(np.zeros((len(LABELS), 1), np.float32), LABELS, BASE)


def wrong_on(base: int, novel: int) -> np.ndarray:
    """A mask: the first ``base`` base images and the first ``novel`` novel images are wrong."""
    mask = np.zeros(len(LABELS), bool)
    mask[:base] = True
    mask[500:500 + novel] = True
    return mask


def test_a_graph_within_a_point_passes_though_agreement_is_below_99_percent():
    # fp32 misses 100 base images; the candidate misses 102 others and gets those 100 right
    reference = logits_for(LABELS, wrong_on(100, 0))
    wrong = np.zeros(len(LABELS), bool)
    wrong[100:202] = True
    gate = accuracy_gate(reference, logits_for(LABELS, wrong), INT8, IMAGES)
    assert gate["top1_agreement"] == pytest.approx(1 - 202 / 1000) and gate["passed"]
    assert [c["criterion"] for c in gate["criteria"]] == [f"{m} within 1.0 points and >= 99% of fp32"
                                                          for m in ("base", "novel", "hm")]
    assert gate["criteria"][0]["value"] == pytest.approx(-0.4, abs=1e-4)  # 80.0 -> 79.6 base accuracy


def test_a_drop_within_a_point_but_below_99_percent_of_fp32_fails():
    # base accuracy 60.0 in fp32, 59.2 in the candidate: 0.8 points, but 98.7% of fp32's
    reference = logits_for(LABELS, wrong_on(200, 0))
    gate = accuracy_gate(reference, logits_for(LABELS, wrong_on(204, 0)), INT8, IMAGES)
    base = gate["criteria"][0]
    assert base["value"] == pytest.approx(-0.8, abs=1e-4) and not base["passed"] and not gate["passed"]
    assert gate["criteria"][1]["passed"]  # novel unchanged


def test_a_drop_of_more_than_a_point_fails_however_high_the_accuracy():
    gate = accuracy_gate(logits_for(LABELS, wrong_on(0, 0)), logits_for(LABELS, wrong_on(0, 6)), INT8, IMAGES)
    novel = gate["criteria"][1]
    assert novel["value"] == pytest.approx(-1.2, abs=1e-4) and not novel["passed"] and not gate["passed"]


def test_agreement_is_a_criterion_where_the_recipe_asks_and_where_there_are_no_labels():
    reference = logits_for(LABELS, wrong_on(0, 0))
    candidate = logits_for(LABELS, wrong_on(0, 4))  # 99.6% agreement, novel -0.8 points
    asked = accuracy_gate(reference, candidate, INT8, GateImages(IMAGES.pixels, LABELS, BASE, agreement=0.999))
    assert asked["criteria"][0]["criterion"] == "top-1 agreement >= 99.9%" and not asked["criteria"][0]["passed"]
    assert not asked["passed"] and all(c["passed"] for c in asked["criteria"][1:])
    unlabelled = accuracy_gate(reference, candidate, INT8, GateImages(IMAGES.pixels, None))
    assert [c["criterion"] for c in unlabelled["criteria"]] == ["top-1 agreement >= 99.0%"] and unlabelled["passed"]
    assert unlabelled["accuracy"] == {}


def test_non_finite_logits_never_pass():
    candidate = logits_for(LABELS, wrong_on(0, 0))
    candidate[3, 0] = np.nan
    assert not accuracy_gate(logits_for(LABELS, wrong_on(0, 0)), candidate, INT8, IMAGES)["passed"]
