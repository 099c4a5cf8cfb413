"""Per-terminal tokens: made once, shown once, kept only as hashes in a file the daemon re-reads on change.

A token is 32 random bytes (urlsafe base64) after a readable prefix; SHA-256 of such a value cannot be
reversed or guessed, so a plain hash is enough (a slow password hash would only slow every call down).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.domain.errors import ConfigError
from appliance.files.durable import PRIVATE_FOLDER, write_atomic

PREFIX = "apl_"
FORMAT = 1
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Scope(enum.IntEnum):
    """Each scope includes the ones below it."""

    read = 1  # stream results, look them up, status, models, reflection
    score = 2  # and submit images
    admin = 3  # and reload the model


@dataclass(frozen=True)
class TokenRecord:
    name: str
    scope: str
    sha256: str
    created_unix: int
    revoked_unix: int | None = None

    @property
    def level(self) -> Scope:
        return Scope[self.scope]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ConfigError(f"A terminal name is 1-64 characters of letters, digits, '.', '_' or '-'; got {name!r}.")
    return name


class TokenStore:
    """The tokens file. Reads are cached and refreshed when the file changes, so `appliance token revoke`
    takes effect on the next call without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, TokenRecord] = {}
        self.generation = 0  # counts the reads, so each reader can tell whether the file changed since it looked

    # --- the daemon's side ----------------------------------------------------------------------

    def lookup(self, token: str) -> TokenRecord | None:
        """The record of this token, revoked or not; None for a token never made here."""
        self._refresh()
        return self._by_hash.get(digest(token))

    def active(self) -> list[TokenRecord]:
        self._refresh()
        return [r for r in self._by_hash.values() if r.revoked_unix is None]

    def live(self, sha256: str) -> bool:
        """Whether the token with this hash is still in the file and not revoked (as last read)."""
        record = self._by_hash.get(sha256)
        return record is not None and record.revoked_unix is None

    def refresh(self) -> bool:
        """Read the file again if it changed (a stat otherwise); True when it was read."""
        return self._refresh()

    def _refresh(self) -> bool:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp:  # unchanged (or still absent: nothing was read)
                return False
            records = self._read() if stamp is not None else []
            self._by_hash = {r.sha256: r for r in records}
            self._stamp = stamp
            self.generation += 1
            return True

    def _read(self) -> list[TokenRecord]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            records = [TokenRecord(**r) for r in raw["tokens"]]
            for r in records:
                Scope[r.scope]
            return records
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"The tokens file {self.path} cannot be read ({type(e).__name__}); fix or remove it."
            ) from e

    # --- `appliance token` ----------------------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[None]:
        """One `appliance token` at a time: a revoke racing an add must not be lost."""
        self.path.parent.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def add(self, name: str, scope: Scope) -> str:
        """Make a token for a terminal and return it; only its hash is kept."""
        check_name(name)
        with self._editing():
            return self._add(name, scope)

    def _add(self, name: str, scope: Scope) -> str:
        records = self._read()
        if any(r.name == name and r.revoked_unix is None for r in records):
            raise ConfigError(f"Terminal {name!r} has a token already; revoke it first to make a new one.")
        token = PREFIX + secrets.token_urlsafe(32)
        records.append(TokenRecord(name=name, scope=scope.name, sha256=digest(token), created_unix=int(time.time())))
        self._write(records)
        return token

    def revoke(self, name: str) -> int:
        """Revoke every live token of a terminal; returns how many."""
        with self._editing():
            return self._revoke(name)

    def _revoke(self, name: str) -> int:
        records = self._read()
        now = int(time.time())
        revoked = [r for r in records if r.name == name and r.revoked_unix is None]
        if not revoked:
            raise ConfigError(f"Terminal {name!r} has no live token.")
        self._write([TokenRecord(**(asdict(r) | {"revoked_unix": now})) if r in revoked else r for r in records])
        return len(revoked)

    def records(self) -> list[TokenRecord]:
        return self._read()

    def _write(self, records: list[TokenRecord]) -> None:
        """Atomically and durably, readable by the daemon's user only."""
        body = {"format": FORMAT, "tokens": [asdict(r) for r in records]}
        write_atomic(self.path, json.dumps(body, indent=1).encode(), sole_writer=True)  # under _editing's lock
