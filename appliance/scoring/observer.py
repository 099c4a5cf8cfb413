"""What the scoring stages report as they go; the daemon's metrics implement it (the stages do not import
the server)."""

from __future__ import annotations

from typing import Protocol


class ScoringObserver(Protocol):
    def on_in_flight(self, count: int) -> None: ...

    def on_batch(self, size: int, infer_ms: float) -> None: ...

    def on_result(self, outcome: str, code: str) -> None: ...

    def on_finished(self, seconds: float, decode_ms: float | None, preprocess_ms: float | None) -> None: ...


class NoObserver:
    def on_in_flight(self, count: int) -> None:
        pass

    def on_batch(self, size: int, infer_ms: float) -> None:
        pass

    def on_result(self, outcome: str, code: str) -> None:
        pass

    def on_finished(self, seconds: float, decode_ms: float | None, preprocess_ms: float | None) -> None:
        pass
