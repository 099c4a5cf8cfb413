"""A result: what the appliance says of one frame of one input. The scoring rooms build it, the journal stores it
(journal/payload.py), and the API turns it into its wire form (api/codec.py); none of them shares a format."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    SCORED = "scored"
    REJECTED = "rejected"


class Decision(Enum):
    NEGATIVE = "negative"  # no finding: the decision falls on a negative label, or no label passes
    POSITIVE = "positive"  # at least one finding
    INDETERMINATE = "indeterminate"  # argmax rule: the top score is below the manifest's threshold


@dataclass(frozen=True)
class InputFacts:
    """What is known of an input before it is decoded."""

    input_id: int
    source: str  # the way in: "folder", "grpc", ...
    file_name: str
    content_hash: str
    # A DICOM instance's SOP Instance UID as the way in was told it (a C-STORE's), where it was: a result rejected
    # before its header was read still names its instance.
    instance_uid: str = ""


@dataclass(frozen=True)
class Timings:
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0  # waiting for a batch and the backend
    infer_ms: float = 0.0  # the batch's inference time, shared by its members
    total_ms: float = 0.0  # from the input being picked up to its result being built
    batch_size: int = 0


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Rejection:
    code: str  # stable, machine-readable (appliance.domain.errors)
    message: str  # one sentence for a person


@dataclass(frozen=True)
class ImageIds:
    """The DICOM identifiers of the image, empty for a PNG or JPEG."""

    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    accession_number: str = ""
    images_in_acquisition: int = 0  # what the header says its series holds, where it says (0: unknown)


@dataclass(frozen=True)
class ScoredBy:
    model_name: str
    model_version: str
    backend: str


@dataclass(frozen=True)
class Heatmap:
    """Where the model looked for one label, as an 8-bit grid at the feature maps' resolution.

    ``values`` is row-major, ``height`` x ``width`` bytes; 255 is the map's peak, 0 no evidence (the map is
    normalised per image, so values compare places within one image, not images). The grid covers the model's
    input, which the source image was resized (and perhaps letterboxed) into: ``extent`` is where the grid's
    outer edges fall in the source image's pixel coordinates, (x0, y0, x1, y1) with x along columns and y down
    rows, so cell (i, j) covers x0 + j * (x1 - x0) / width ... and may reach past the image over padding.
    """

    width: int
    height: int
    values: bytes
    label: str  # the class the map explains: the top-scoring one (the evidence for it, whatever the decision)
    method: str  # "gradcam" or "cam"
    extent: tuple[float, float, float, float]

    @property
    def peak(self) -> tuple[float, float]:
        """The centre of the grid's hottest cell (the first in row order on a tie), in source pixels (x, y)."""
        index = max(range(len(self.values)), key=self.values.__getitem__)
        row, col = divmod(index, self.width)
        x0, y0, x1, y1 = self.extent
        return x0 + (col + 0.5) * (x1 - x0) / self.width, y0 + (row + 0.5) * (y1 - y0) / self.height


@dataclass(frozen=True)
class Result:
    input: InputFacts
    scored_by: ScoredBy
    outcome: Outcome
    created_unix_ms: int
    timings: Timings = field(default_factory=Timings)
    ids: ImageIds = field(default_factory=ImageIds)
    frame_index: int = 0  # 0-based frame of a multi-frame input
    frame_count: int = 1
    scores: tuple[LabelScore, ...] = ()
    decision: Decision | None = None  # set when scored
    findings: tuple[str, ...] = ()  # labels that make the decision (the top label for argmax)
    threshold: float = 0.0
    rejection: Rejection | None = None  # set when rejected
    heatmap: Heatmap | None = None  # where the model looked, when its manifest declares a heatmap and it is on
    sequence: int = 0  # the journal's number, once stored

    @property
    def rejected(self) -> bool:
        return self.outcome is Outcome.REJECTED
