"""One journaled input on its way through the scoring stages."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from appliance.domain.manifest import Manifest
from appliance.domain.result import InputFacts, Result, ScoredBy
from appliance.inference.batcher import BatchTiming, Row
from appliance.prepare.preparer import Prepared


@dataclass(frozen=True)
class Scorer:
    """The model that scores a batch: its manifest (labels, decision rule, heatmap) and the name of the backend
    it runs on. The batcher carries it with each batch; a result records it as its ``scored_by``."""

    manifest: Manifest
    backend: str

    @property
    def scored_by(self) -> ScoredBy:
        return ScoredBy(self.manifest.model.name, self.manifest.model.version, self.backend)


# One frame's outcome from the batcher: its row (activated scores, heatmap) or an error, and its batch's timing.
Frame = tuple[Row | None, BaseException | None, BatchTiming[Scorer]]


@dataclass
class Job:
    facts: InputFacts
    path: Path
    picked_up: float = field(default_factory=time.perf_counter)
    future: Future[list[Result]] | None = None  # its results, for a way in that answers with them (Score)
    prepared: Prepared | None = None
    frames: list[Frame | None] = field(default_factory=list)
    remaining: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
