"""Turns a model's raw output row into per-label scores and a decision, as the manifest says."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision


@dataclass(frozen=True)
class Scores:
    labels: tuple[str, ...]
    values: tuple[float, ...]
    decision: Decision  # what the result reports (Result.decision)
    findings: tuple[str, ...]
    threshold: float


def activate(raw: np.ndarray, activation: str) -> np.ndarray:
    """Apply the manifest's activation to a batch (N x labels) in float64 for stable sums."""
    x = raw.astype(np.float64)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def decide(row: np.ndarray, manifest: Manifest) -> Scores:
    """One row of activated scores -> the decision. Raises ValueError on a width mismatch."""
    labels = tuple(manifest.output.labels)
    if row.shape != (len(labels),):
        raise ValueError(f"The model gave {row.size} scores; the manifest names {len(labels)} labels.")
    if not np.all(np.isfinite(row)):
        raise ValueError("The model gave a non-finite score (NaN or infinity) for this input.")
    rule = manifest.decision
    negatives = set(rule.negative_labels)
    if rule.rule == "argmax":
        top = int(np.argmax(row))
        findings: tuple[str, ...] = (labels[top],)
        if row[top] < rule.threshold:
            decision = Decision.INDETERMINATE
        elif labels[top] in negatives:
            decision = Decision.NEGATIVE
        else:
            decision = Decision.POSITIVE
    else:
        findings = tuple(lb for lb, v in zip(labels, row, strict=True) if v >= rule.threshold)
        decision = Decision.POSITIVE if set(findings) - negatives else Decision.NEGATIVE
    return Scores(
        labels=labels,
        values=tuple(float(v) for v in row),
        decision=decision,
        findings=findings,
        threshold=rule.threshold,
    )
