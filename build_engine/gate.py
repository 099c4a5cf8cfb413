"""The accuracy gate: an artifact's scores against the FP32 model's on the same validation tensors.

Scores are compared after the manifest's activation (what results carry), decisions with the daemon's
own `decide`, and AUC per label (where labels exist) with the rank formula (Mann-Whitney U).
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


@dataclass
class GateReport:
    images: int
    agreement: float
    disagreements: int
    max_abs_diff: float
    mean_abs_diff: float
    auc: dict[str, dict[str, float | None]] = field(default_factory=dict)  # label -> fp32, artifact, drop
    auc_note: str = ""
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
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _decisions(manifest: Manifest, scores: np.ndarray) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for row in scores:
        try:
            verdict = decide(row, manifest)
            out.append((verdict.verdict.value, verdict.findings))
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
) -> GateReport:
    """Both score arrays are N x labels after activation; labels per row when the set is labelled."""
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
    return report
