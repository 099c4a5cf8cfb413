"""The gate's arithmetic: AUC against the pairwise definition, agreement, score differences, tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.domain.manifest import Accuracy, load_manifest
from build_engine.gate import auc, compare, peaks_agree

from ..integration.conftest import DEFAULT_MODEL, TEST_MODEL


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + labels * 0.4, 1)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_auc_edges() -> None:
    labels = np.array([False, False, True, True])
    assert auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(labels, np.full(4, 0.5)) == 0.5
    assert auc(np.array([True, True]), np.array([0.1, 0.2])) is None  # no negatives


def _pipeline_manifest():
    return load_manifest(TEST_MODEL).manifest


def test_identical_scores_pass_with_zero_differences() -> None:
    manifest = _pipeline_manifest()
    ref = np.linspace(0.01, 0.99, 50)[:, None]
    report = compare(manifest, ref, ref.copy(), None, Accuracy(), "no labels")
    assert report.passed and report.agreement == 1.0 and report.max_abs_diff == 0.0
    assert report.auc_note == "no labels" and "no AUC (unlabelled)" in report.summary()


def test_a_flipped_decision_and_a_large_difference_fail_with_the_figures() -> None:
    manifest = _pipeline_manifest()  # threshold rule at 0.5
    ref = np.array([[0.1], [0.4], [0.6], [0.9]])
    cand = np.array([[0.1], [0.55], [0.6], [0.9]])  # the second image crosses the threshold
    report = compare(manifest, ref, cand, None, Accuracy(min_agreement=0.9, max_abs_diff=0.1, mean_abs_diff=0.1))
    assert report.disagreements == 1 and report.agreement == 0.75
    assert report.max_abs_diff == pytest.approx(0.15)
    assert report.mean_abs_diff == pytest.approx(0.15 / 4)
    assert not report.passed
    assert any("agreement 75.00% (1 of 4 decisions differ) < 90.00%" in f for f in report.failures)
    assert any("max |score diff| 0.1500 > 0.1" in f for f in report.failures)


def test_a_nan_score_counts_as_a_disagreement_and_the_largest_difference() -> None:
    manifest = _pipeline_manifest()
    ref = np.array([[0.2], [0.8]])
    cand = np.array([[0.2], [np.nan]])
    report = compare(manifest, ref, cand, None, Accuracy())
    assert report.disagreements == 1 and report.max_abs_diff == 1.0 and not report.passed


def test_auc_per_label_and_its_drop_with_argmax_labels() -> None:
    manifest = load_manifest(DEFAULT_MODEL, require_onnx=False).manifest
    labels = [frozenset({"glioma"}), frozenset({"glioma"}), frozenset(), frozenset({"pituitary"})]
    ref = np.array([[0.9, 0.05, 0.03, 0.02], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.05, 0.05, 0.1, 0.8]])
    cand = ref.copy()
    cand[0, 0], cand[2, 0] = 0.55, 0.75  # glioma now ranks a negative above a positive
    report = compare(manifest, ref, cand, labels, Accuracy(max_abs_diff=1, mean_abs_diff=1, min_agreement=0))
    assert report.auc["glioma"]["fp32"] == 1.0
    assert report.auc["glioma"]["artifact"] == pytest.approx(_pairwise_auc(np.array([1, 1, 0, 0], bool), cand[:, 0]))
    assert report.auc["glioma"]["drop"] == pytest.approx(0.5)  # 2 of 4 positive-negative pairs now misordered
    assert report.auc["meningioma"]["drop"] is None  # no positives for it
    assert any("AUC of glioma drops 0.5000 > 0.01" in f for f in report.failures)


def _maps(peaks: list[tuple[int, int]], size: int = 8) -> np.ndarray:
    """One N x size x size map per peak: a low uniform field with its largest value at the peak."""
    maps = np.full((len(peaks), size, size), 0.2, dtype=np.float32)
    for i, (row, col) in enumerate(peaks):
        maps[i, row, col] = 1.0
    return maps


def test_heatmap_peaks_within_one_cell_agree_and_farther_ones_do_not() -> None:
    ref = _maps([(3, 3)] * 6)
    cand = _maps([(3, 3), (4, 4), (2, 4), (3, 5), (5, 5), (0, 3)])  # same, diagonal, diagonal, 2 right, 2 diag, 3 up
    assert peaks_agree(ref, cand).tolist() == [True, True, True, False, False, False]


def test_heatmap_peaks_that_disagree_fail_the_gate_with_the_figures() -> None:
    manifest = _pipeline_manifest()
    scores = np.array([[0.1], [0.9], [0.8], [0.2]])
    ref, cand = _maps([(1, 1), (6, 6), (4, 2), (0, 7)]), _maps([(1, 2), (2, 1), (4, 2), (7, 0)])
    report = compare(manifest, scores, scores.copy(), None, Accuracy(), reference_heatmaps=ref, candidate_heatmaps=cand)
    assert report.agreement == 1.0 and report.max_abs_diff == 0.0  # the scores alone would pass
    assert report.heatmap_agreement == 0.5 and report.heatmap_disagreements == 2
    assert report.failures == ["heatmap peak agreement 50.00% (2 of 4 peaks more than one cell from FP32's) < 95.00%"]
    assert "heatmap peaks 50.0% (2/4) within a cell of FP32's" in report.summary()
    as_recorded = report.to_dict()  # what the sidecar's gate holds
    assert as_recorded["heatmap_agreement"] == 0.5 and not as_recorded["passed"]

    lenient = Accuracy(min_heatmap_agreement=0.5)
    assert compare(manifest, scores, scores, None, lenient, reference_heatmaps=ref, candidate_heatmaps=cand).passed


def test_an_artifact_without_a_heatmap_fails_where_fp32_has_one() -> None:
    manifest = _pipeline_manifest()
    scores = np.array([[0.1], [0.9]])
    report = compare(manifest, scores, scores, None, Accuracy(), reference_heatmaps=_maps([(1, 1), (2, 2)]))
    assert report.heatmap_agreement == 0.0
    assert report.failures == ["the artifact returns no heatmap, though the manifest declares one"]


def test_without_a_heatmap_in_the_manifest_the_gate_says_nothing_of_heatmaps() -> None:
    manifest = _pipeline_manifest()
    scores = np.array([[0.1], [0.9]])
    report = compare(manifest, scores, scores, None, Accuracy())
    assert report.passed and report.heatmap_agreement is None and "heatmap" not in report.summary()


def test_flat_and_non_finite_heatmaps() -> None:
    """A map with no positive cell points nowhere: it agrees only with another such map. NaN agrees with nothing."""
    ref = np.zeros((4, 7, 7), dtype=np.float32)
    ref[2:, 3, 3] = 1.0
    cand = np.zeros_like(ref)
    cand[1, 0, 0] = 0.5  # FP32 saw nothing, the artifact a spot
    cand[2, 3, 3] = 1.0
    cand[3] = np.nan
    cand[3, 3, 3] = 1.0
    assert peaks_agree(ref, cand).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="heatmap shapes differ"):
        peaks_agree(ref, cand[:, :6])
