"""The throttle for lines a peer can repeat at will: the first at once, then one count a period per kind."""

from __future__ import annotations

import logging
import threading

from appliance.log_throttle import MAX_KINDS, OTHER, LogThrottle


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.summary = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if " more in the last " in record.getMessage():
            self.summary.set()


def _logger(name: str) -> tuple[logging.Logger, _Lines]:
    logger = logging.getLogger(f"tests.throttle.{name}")
    logger.propagate = False
    lines = _Lines()
    logger.handlers[:] = [lines]
    logger.setLevel(logging.INFO)
    return logger, lines


def test_a_flood_is_one_line_then_its_count() -> None:
    logger, lines = _logger("flood")
    # 3,000 calls take milliseconds; a period of 2 s keeps them inside one period on a loaded box too.
    throttle = LogThrottle(logger, period_s=2.0)
    for i in range(3000):
        throttle.log("refused: no token", "refused call %d: no token", i)
    throttle.log("refused: unknown token", "refused: unknown token")
    assert lines.lines == ["refused call 0: no token", "refused: unknown token"]
    assert lines.summary.wait(60)  # the count comes when the period ends, though the flood has stopped
    assert lines.lines[2:] == ["refused: no token: 2999 more in the last 2 s"]
    throttle.close()


def test_kinds_past_the_limit_share_one_count() -> None:
    logger, lines = _logger("kinds")
    throttle = LogThrottle(logger, period_s=60.0)
    for i in range(MAX_KINDS + 10):
        throttle.log(f"kind {i}", "kind %d", i)
    assert len(lines.lines) == MAX_KINDS + 1  # each known kind once, then the first of the rest as OTHER
    assert OTHER in throttle._kinds
    throttle.close()
