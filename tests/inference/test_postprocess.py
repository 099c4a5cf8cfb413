"""Activation and the decision rules as a manifest states them."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision
from appliance.inference.postprocess import activate, decide


def _manifest(rule: str, threshold: float, labels: list[str], negatives: list[str]) -> Manifest:
    return Manifest.model_validate(
        {
            "model": {"name": "m", "version": "1"},
            "input": {"name": "x", "height": 8, "width": 8},
            "output": {"name": "y", "labels": labels},
            "decision": {"rule": rule, "threshold": threshold, "negative_labels": negatives},
        }
    )


def test_softmax_and_sigmoid() -> None:
    sm = activate(np.array([[0.0, np.log(3.0)]]), "softmax")
    assert sm[0] == pytest.approx([0.25, 0.75])
    assert activate(np.array([[0.0]]), "sigmoid")[0, 0] == pytest.approx(0.5)
    raw = np.array([[0.1, 0.9]])
    assert np.array_equal(activate(raw, "none"), raw)


@pytest.mark.parametrize(
    ("row", "decision", "findings"),
    [
        ([0.7, 0.1, 0.1, 0.1], Decision.POSITIVE, ("glioma",)),
        ([0.1, 0.1, 0.7, 0.1], Decision.NEGATIVE, ("notumor",)),
        ([0.3, 0.2, 0.25, 0.25], Decision.INDETERMINATE, ("glioma",)),
    ],
)
def test_argmax_rule(row: list[float], decision: Decision, findings: tuple[str, ...]) -> None:
    m = _manifest("argmax", 0.5, ["glioma", "meningioma", "notumor", "pituitary"], ["notumor"])
    s = decide(np.array(row), m)
    assert s.decision is decision and s.findings == findings and s.threshold == 0.5


def test_threshold_rule_is_per_label() -> None:
    m = _manifest("threshold", 0.5, ["lesion", "nodule"], [])
    assert decide(np.array([0.2, 0.6]), m).findings == ("nodule",)
    assert decide(np.array([0.2, 0.4]), m).decision is Decision.NEGATIVE


def test_width_mismatch_is_an_error() -> None:
    m = _manifest("threshold", 0.5, ["lesion"], [])
    with pytest.raises(ValueError, match="2 scores"):
        decide(np.array([0.1, 0.2]), m)
