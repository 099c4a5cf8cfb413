"""The accuracy gate: an artifact's scores and heatmaps against the FP32 model's on the same validation tensors.

Scores are compared after the manifest's activation (what results carry), decisions with the daemon's
own `decide`, and AUC per label (where labels exist) with the rank formula (Mann-Whitney U). Where the
manifest declares a heatmap, each image's heatmap peak (the cell a radiologist's eye goes to) must lie
within one cell of FP32's, in any direction (Chebyshev distance <= 1), on enough of the images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from appliance.toolkit import Accuracy, Manifest, decide


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; ties count half. None without both positives and negatives."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties so equal scores contribute one half.
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def peaks_agree(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per image (N x H x W maps): whether the candidate's peak cell is within one cell of the reference's
    (Chebyshev distance <= 1). A map with no positive cell points nowhere and agrees only with another such
    map; a map holding a non-finite value agrees with nothing."""
    if reference.shape != candidate.shape or reference.ndim != 3:
        raise ValueError(f"heatmap shapes differ or are not N x H x W: {reference.shape} vs {candidate.shape}")
    n, height, width = reference.shape
    ref = reference.reshape(n, height * width).astype(np.float64)
    cand = candidate.reshape(n, height * width).astype(np.float64)
    finite = np.isfinite(ref).all(axis=1) & np.isfinite(cand).all(axis=1)
    ref, cand = np.where(np.isfinite(ref), ref, 0.0), np.where(np.isfinite(cand), cand, 0.0)
    ref_row, ref_col = np.unravel_index(ref.argmax(axis=1), (height, width))
    cand_row, cand_col = np.unravel_index(cand.argmax(axis=1), (height, width))
    near = np.maximum(np.abs(ref_row - cand_row), np.abs(ref_col - cand_col)) <= 1
    ref_points, cand_points = ref.max(axis=1) > 0, cand.max(axis=1) > 0
    return finite & np.where(ref_points & cand_points, near, ref_points == cand_points)


@dataclass
class GateReport:
    images: int
    agreement: float
    disagreements: int
    max_abs_diff: float
    mean_abs_diff: float
    auc: dict[str, dict[str, float | None]] = field(default_factory=dict)  # label -> fp32, artifact, drop
    auc_note: str = ""
    # Share of images whose heatmap peak is within one cell of FP32's; None where the model declares no heatmap.
    heatmap_agreement: float | None = None
    heatmap_disagreements: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        text = (
            f"agreement {self.agreement:.1%} ({self.images - self.disagreements}/{self.images}), "
            f"max |score diff| {self.max_abs_diff:.4f}, mean {self.mean_abs_diff:.4f}"
        )
        drops = [v["drop"] for v in self.auc.values() if v["drop"] is not None]
        if drops:
            text += f", worst AUC drop {max(drops):+.4f}"
        elif self.auc:
            text += ", no AUC (every image has the same label)"
        elif self.auc_note:
            text += ", no AUC (unlabelled)"
        if self.heatmap_agreement is not None:
            kept = self.images - self.heatmap_disagreements
            text += f", heatmap peaks {self.heatmap_agreement:.1%} ({kept}/{self.images}) within a cell of FP32's"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _decisions(manifest: Manifest, scores: np.ndarray) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for row in scores:
        try:
            decided = decide(row, manifest)
            out.append((decided.decision.value, decided.findings))
        except ValueError:  # a non-finite score: never agrees with anything
            out.append(("invalid", ()))
    return out


def compare(
    manifest: Manifest,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: list[frozenset[str]] | None,
    tolerance: Accuracy,
    label_note: str = "",
    *,
    reference_heatmaps: np.ndarray | None = None,
    candidate_heatmaps: np.ndarray | None = None,
) -> GateReport:
    """Both score arrays are N x labels after activation; labels per row when the set is labelled.

    Heatmaps (N x H x W) are compared where FP32 has them (the manifest declares one); a candidate without
    them fails.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"score shapes differ: {reference.shape} vs {candidate.shape}")
    n = len(reference)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    diff = np.where(np.isfinite(diff), diff, 1.0)  # a NaN score is as wrong as a score can be
    disagreements = sum(
        a != b for a, b in zip(_decisions(manifest, reference), _decisions(manifest, candidate), strict=True)
    )
    report = GateReport(
        images=n,
        agreement=(n - disagreements) / n if n else 0.0,
        disagreements=disagreements,
        max_abs_diff=float(diff.max()) if n else 0.0,
        mean_abs_diff=float(diff.mean()) if n else 0.0,
        auc_note=label_note if labels is None else "",
    )
    if labels is not None:
        for col, name in enumerate(manifest.output.labels):
            truth = np.array([name in row for row in labels])
            ref_auc, cand_auc = auc(truth, reference[:, col]), auc(truth, candidate[:, col])
            drop = None if ref_auc is None or cand_auc is None else ref_auc - cand_auc
            report.auc[name] = {"fp32": ref_auc, "artifact": cand_auc, "drop": drop}
        if all(v["drop"] is None for v in report.auc.values()):
            report.auc_note = "no label has both positive and negative images"
    if report.agreement < tolerance.min_agreement:
        differ = f"{disagreements} of {n} decisions differ"
        report.failures.append(f"agreement {report.agreement:.2%} ({differ}) < {tolerance.min_agreement:.2%}")
    if report.max_abs_diff > tolerance.max_abs_diff:
        report.failures.append(f"max |score diff| {report.max_abs_diff:.4f} > {tolerance.max_abs_diff}")
    if report.mean_abs_diff > tolerance.mean_abs_diff:
        report.failures.append(f"mean |score diff| {report.mean_abs_diff:.4f} > {tolerance.mean_abs_diff}")
    for name, v in report.auc.items():
        if v["drop"] is not None and v["drop"] > tolerance.max_auc_drop:
            report.failures.append(f"AUC of {name} drops {v['drop']:.4f} > {tolerance.max_auc_drop}")
    if reference_heatmaps is not None:
        _compare_heatmaps(report, reference_heatmaps, candidate_heatmaps, tolerance)
    return report


def _compare_heatmaps(
    report: GateReport, reference: np.ndarray, candidate: np.ndarray | None, tolerance: Accuracy
) -> None:
    n = report.images
    if candidate is None:
        report.heatmap_agreement, report.heatmap_disagreements = 0.0, n
        report.failures.append("the artifact returns no heatmap, though the manifest declares one")
        return
    agree = peaks_agree(reference, candidate)
    report.heatmap_disagreements = int((~agree).sum())
    report.heatmap_agreement = float(agree.mean()) if n else 0.0
    if report.heatmap_agreement < tolerance.min_heatmap_agreement:
        report.failures.append(
            f"heatmap peak agreement {report.heatmap_agreement:.2%} ({report.heatmap_disagreements} of {n} peaks "
            f"more than one cell from FP32's) < {tolerance.min_heatmap_agreement:.2%}"
        )
