"""Open calls by the token they came with, so that revoking a terminal's token (`appliance token revoke`, from
another process) cuts what it has open within a second: its result streams, its reflection stream and a Score
it waits on, not only its next call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from appliance.api.tokens import TokenRecord, TokenStore
from appliance.domain.errors import ConfigError
from appliance.log_throttle import LogThrottle

log = logging.getLogger(__name__)

WATCH_S = 0.25  # while calls are open, the tokens file is looked at (one stat) this often
# A stream looks again before it sends a result if the last look is older than this: a result stored after
# the revocation was written never reaches the terminal, at one stat per FRESH_S however many streams send.
FRESH_S = 0.01
CODE = grpc.StatusCode.UNAUTHENTICATED
SENTENCE = "This terminal's token was revoked; ask IT for a new one."


@dataclass(eq=False)
class OpenCall:
    """A call being served for a terminal's token."""

    method: str
    terminal: str
    sha256: str
    task: asyncio.Task[object] | None
    revoked: bool = False
    waiting: bool = False  # parked in the method's own code (not in grpc's send): a cancel lands there


class OpenCalls:
    """The calls open on the server's loop, by the hash of their token. A watch task on that loop looks at
    the tokens file while any is open; when a token is no longer live its calls are cut: each is marked, and
    one parked in the method's own code is cancelled, to be answered UNAUTHENTICATED by the auth wrapper
    (``appliance.api.auth``), which also checks the mark before each message it sends."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens
        self._calls: dict[str, set[OpenCall]] = {}
        self._looked = 0.0
        self._generation = -1  # the tokens file as this last swept the open calls
        self._watch: asyncio.Task[None] | None = None
        self._unreadable = LogThrottle(log, logging.ERROR)

    def start(self) -> None:
        """On the server's loop."""
        self._watch = asyncio.get_running_loop().create_task(self._watching(), name="token-revocation-watch")

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._unreadable.close()

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            if self._calls:
                self.check()

    def check(self) -> None:
        """Read the tokens file if it changed, and cut the calls of every token no longer live."""
        self._looked = time.monotonic()
        try:
            self.tokens.refresh()  # the interceptor may have read a change first: the generation tells
        except ConfigError as e:
            # Open calls go on (their tokens were good, and nothing says they were revoked); new calls are
            # refused by the interceptor until the file reads again.
            self._unreadable.log("tokens file unreadable", "%s", e.message)
            return
        if self.tokens.generation == self._generation:
            return
        self._generation = self.tokens.generation
        for sha256, calls in list(self._calls.items()):
            if not self.tokens.live(sha256):
                for call in list(calls):
                    self._cut(call)

    def fresh(self, call: OpenCall) -> bool:
        """Whether ``call`` may go on: its token still live, as of at most FRESH_S ago."""
        if not call.revoked and time.monotonic() - self._looked > FRESH_S:
            self.check()
        # Not only the sweep's verdict: a call that registered just after the sweep that followed its token's
        # revocation was never in it, and the generation has not moved since.
        if not call.revoked and not self.tokens.live(call.sha256):
            self._cut(call)
        return not call.revoked

    def _cut(self, call: OpenCall) -> None:
        if call.revoked:
            return
        call.revoked = True
        log.warning("cut %s of terminal %r: its token was revoked", call.method.rsplit("/", 1)[-1], call.terminal)
        if call.waiting and call.task is not None:
            call.task.cancel()

    @contextlib.contextmanager
    def open(self, method: str, record: TokenRecord) -> Iterator[OpenCall]:
        """Hold a call as open for its token while it runs (on the server's loop, inside the call's task)."""
        call = OpenCall(method, record.name, record.sha256, asyncio.current_task())
        self._calls.setdefault(record.sha256, set()).add(call)
        if not self.tokens.live(record.sha256):  # revoked between the interceptor's lookup and now
            self._cut(call)
        try:
            yield call
        finally:
            calls = self._calls.get(record.sha256)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._calls[record.sha256]

    def count(self) -> int:
        return sum(len(c) for c in self._calls.values())
