"""A series result: what the appliance says of one DICOM series, as radiologists read it. Its images are scored one
by one (each result streams the moment it is stored); once the series is complete (quiet for `series.stable_s`, or
its header says all are in) their scores combine, as the manifest's [series] says, into one series decision with a
few key images. A late image re-opens the series, and its next result revises the one before."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from appliance.domain.result import Decision, LabelScore, ScoredBy


class Completion(Enum):
    STABLE = "stable"  # no new image for `series.stable_s`
    HEADER = "header"  # the header says all are in (Number of Frames, Images in Acquisition)


@dataclass(frozen=True)
class KeyImage:
    """One of the series' top-scoring images for its key label: what the KOS references and the SCs show."""

    sop_instance_uid: str
    frame_index: int  # 0-based frame of a multi-frame instance
    score: float  # its score for the key label
    sequence: int  # the image result's sequence number


@dataclass(frozen=True)
class SeriesResult:
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    images_scored: int  # frames scored (a multi-frame instance counts each frame)
    images_rejected: int
    scores: tuple[LabelScore, ...]  # per label, combined over the images as the manifest's [series] says
    decision: Decision
    findings: tuple[str, ...]  # labels that make the decision (the top label for argmax)
    threshold: float
    key_label: str  # the label the key images are chosen for: the top finding, else the top-scoring label
    key_images: tuple[KeyImage, ...]  # best first
    scored_by: ScoredBy
    combine: str  # how the scores were combined, in words ("max", "mean of top 3", "3rd highest: at least 3 ...")
    completion: Completion
    revision: int  # 1 for a series' first result; each late image's revision adds one
    created_unix_ms: int
    first_image_unix_ms: int  # when its first image result was stored
    last_image_unix_ms: int  # and its last: the quiet period ran from here
    revises_sequence: int = 0  # the result this one supersedes (0: none)
    report_uid: str = ""  # its Enhanced SR's SOP Instance UID, where it goes to a PACS
    revises_report_uid: str = ""  # the superseded result's SR (named in Predecessor Documents)
    sequence: int = 0  # the journal's number, once stored


@dataclass(frozen=True)
class ImageScores:
    """One scored image of a series, as the combination sees it."""

    sequence: int
    sop_instance_uid: str
    frame_index: int
    scores: Mapping[str, float]


def per_label(images: Sequence[ImageScores], labels: Sequence[str], combine: str, k: int) -> tuple[LabelScore, ...]:
    """Each label's series score: ``max`` (its best image), ``top_k_mean`` (the mean of its best ``k``, fewer where
    the series has fewer), ``at_least`` (its ``k``-th best: at or over a threshold exactly when at least ``k``
    images are; 0 where the series has fewer than ``k``)."""
    out = []
    for label in labels:
        best = sorted((i.scores[label] for i in images), reverse=True)
        if not best:
            value = 0.0
        elif combine == "max":
            value = best[0]
        elif combine == "top_k_mean":
            value = sum(best[:k]) / len(best[:k])
        elif combine == "at_least":
            value = best[k - 1] if len(best) >= k else 0.0
        else:
            raise ValueError(f"unknown series combination {combine!r}")
        out.append(LabelScore(label, float(value)))
    return tuple(out)


def key_images(images: Sequence[ImageScores], label: str, count: int) -> tuple[KeyImage, ...]:
    """The ``count`` best images for ``label``, best first (ties: the earlier result first)."""
    ranked = sorted(images, key=lambda i: (-i.scores[label], i.sequence))[:count]
    return tuple(KeyImage(i.sop_instance_uid, i.frame_index, i.scores[label], i.sequence) for i in ranked)


def key_floors(candidates: Sequence[Mapping[str, float]], kept: int) -> dict[str, float]:
    """Per label, the score an image must beat to be among the best ``kept`` of ``candidates`` (-inf where there
    are fewer): an image at or under every floor is never a key image."""
    floors: dict[str, float] = {}
    for label in {label for scores in candidates for label in scores}:
        best = sorted((scores.get(label, float("-inf")) for scores in candidates), reverse=True)
        floors[label] = best[kept - 1] if len(best) >= kept else float("-inf")
    return floors


def among_best(candidates: Sequence[Mapping[str, float]], kept: int) -> list[Mapping[str, float]]:
    """Those of ``candidates`` among the best ``kept`` for some label (ties: the earlier first), in their order."""
    keep: set[int] = set()
    for label in {label for scores in candidates for label in scores}:
        ranked = sorted(range(len(candidates)), key=lambda i: (-candidates[i].get(label, float("-inf")), i))
        keep.update(ranked[:kept])
    return [c for i, c in enumerate(candidates) if i in keep]


def key_label(scores: Sequence[LabelScore], findings: Sequence[str], negatives: Sequence[str]) -> str:
    """The label the key images show: the top-scoring finding that is not a negative label; else the top-scoring
    label that is not a negative one (where the series is negative: the images nearest to a finding); else the
    top-scoring label."""
    ranked = sorted(scores, key=lambda s: -s.score)
    positive = [s.label for s in ranked if s.label in findings and s.label not in negatives]
    if positive:
        return positive[0]
    others = [s.label for s in ranked if s.label not in negatives]
    return others[0] if others else ranked[0].label
