"""One reader follows the journal's new results and shares them with every open stream.

A stream serves from the shared window of recent results while it keeps up, and reads the journal by
sequence (a page at a time) while it is behind: a slow or stalled terminal holds its cursor and the
messages gRPC's flow control lets through, never a queue of its own, and never slows another.

Results travel as encoded bytes, made once per result rather than once per result per stream. Both kinds (image
and series results, one numbering) are published with their kind: each stream sends the kinds its terminal asked for.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
from collections import deque
from typing import Literal, NamedTuple

from appliance.api.codec import encoded_stored
from appliance.journal.journal import Journal, StoredResult
from appliance.scheduling import lower_this_thread

log = logging.getLogger(__name__)

WINDOW = 4096  # recent results kept for streams that keep up
PAGE = 256
FOLLOW_WAKE_S = 0.5

Kind = Literal["image", "series"]


class Published(NamedTuple):
    """A stored result as streams send it."""

    seq: int
    kind: Kind
    data: bytes  # the encoded appliance.v1.Result

    @classmethod
    def of(cls, stored: StoredResult) -> Published:
        return cls(stored.seq, stored.kind, encoded_stored(stored))


class ResultFeed:
    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop) -> None:
        self.journal = journal
        self.loop = loop
        self._seqs: deque[int] = deque(maxlen=WINDOW)
        self._messages: deque[Published] = deque(maxlen=WINDOW)
        self._tick: asyncio.Future[None] = loop.create_future()
        self._followed = journal.last_sequence()  # the follower's position (its thread only)
        self.published = self._followed  # the newest result in the window (the loop's thread only)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="result-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while not self._stop.is_set():
            try:
                self.journal.wait_for_results(self._followed, FOLLOW_WAKE_S)
                rows = self.journal.results_after(self._followed, PAGE)
            except Exception as e:  # the journal's own problem is reported by the daemon's health
                log.debug("result feed: journal read failed: %s", type(e).__name__)
                self._stop.wait(FOLLOW_WAKE_S)
                continue
            if rows:
                messages = [Published.of(r) for r in rows]
                self._followed = rows[-1].seq
                self.loop.call_soon_threadsafe(self._publish, messages)

    def _publish(self, messages: list[Published]) -> None:
        for message in messages:
            self._seqs.append(message.seq)
            self._messages.append(message)
        self.published = messages[-1].seq
        tick, self._tick = self._tick, self.loop.create_future()
        tick.set_result(None)

    def after(self, seq: int) -> list[Published] | None:
        """Results of both kinds past ``seq`` from the window, at most a page; None when the window starts after
        ``seq`` (the caller reads the journal instead)."""
        if seq >= self.published:
            return []
        if not self._seqs or self._seqs[0] > seq + 1:
            return None
        start = bisect.bisect_right(self._seqs, seq)
        end = min(start + PAGE, len(self._messages))
        return [self._messages[i] for i in range(start, end)]

    async def wait_past(self, seq: int, timeout: float) -> None:
        """Until a result past ``seq`` is published or the timeout passes."""
        if self.published > seq:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._tick), timeout)
