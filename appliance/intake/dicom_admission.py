"""Who may hold the DICOM receiver's connections, and how many: the allowed callers, the caps on
connections per host and on those still without an association request, the caps on accepted associations
per calling AE title and in all, and the one throttled log (and counter) of every refusal and timeout."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from appliance.config import DicomConfig
from appliance.intake.dicom_pdu import printable
from appliance.log_throttle import LogThrottle

log = logging.getLogger("appliance.intake.dicom_receiver")  # one logger for the receiver's lines, front and SCP

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refusal(Enum):
    """Why a connection was refused or an association aborted: a metric label, and the sentence logged."""

    HOST_LIMIT = "host_limit", "more than dicom.max_associations_per_host = {c.max_associations_per_host} open"
    PENDING_FULL = (
        "pending_full",
        "the oldest of dicom.max_pending = {c.max_pending} connections still without an association request, "
        "closed for a newer one",
    )
    TLS = "tls", "no TLS session"
    REQUEST_TIMEOUT = (
        "request_timeout",
        "no whole A-ASSOCIATE-RQ within dicom.request_timeout_s = {c.request_timeout_s}",
    )
    CLOSED = "closed_before_request", "closed before its A-ASSOCIATE-RQ was whole"
    NOT_A_REQUEST = "not_a_request", "its first PDU is not an A-ASSOCIATE-RQ"
    REQUEST_TOO_LARGE = (
        "request_too_large",
        "an A-ASSOCIATE-RQ longer than dicom.max_request_kb = {c.max_request_kb}, refused unread",
    )
    CALLING_AE = "calling_ae", "calling AE title not allowed"
    CALLED_AE = "called_ae", "called AE title is not this receiver's"
    AE_HOST = "ae_host", "this AE title may not send from this host"
    AE_LIMIT = "ae_limit", "this AE title holds dicom.max_associations_per_ae = {c.max_associations_per_ae} already"
    LIMIT = "association_limit", "dicom.max_associations = {c.max_associations} are open"
    PDU_TOO_LARGE = "pdu_too_large", "a PDU longer than this receiver accepts, refused unread"
    NETWORK_TIMEOUT = "network_timeout", "a PDU not received or sent whole within dicom.timeout_s = {c.timeout_s}"
    IDLE = "idle", "nothing received for dicom.timeout_s = {c.timeout_s}"
    MESSAGE_TOO_LARGE = (
        "message_too_large",
        "a message (a C-STORE's data set) past limits.max_file_mb, or another message past 64 KiB, "
        "refused unread from there",
    )
    TOO_MANY_MESSAGES = (
        "too_many_messages",
        "messages sent on without waiting for their answers (this receiver negotiates one at a time), "
        "refused unread from there",
    )
    UNEXPECTED_MESSAGE = (
        "unexpected_message",
        "a message this receiver does not serve (it takes C-ECHO and C-STORE requests only), refused from there",
    )

    def __init__(self, label: str, sentence: str) -> None:
        self.label = label
        self.sentence = sentence

    @property
    def aborts(self) -> bool:
        """Whether it ends an accepted association, rather than refusing a connection before one."""
        return self in (
            Refusal.PDU_TOO_LARGE,
            Refusal.MESSAGE_TOO_LARGE,
            Refusal.TOO_MANY_MESSAGES,
            Refusal.UNEXPECTED_MESSAGE,
            Refusal.NETWORK_TIMEOUT,
            Refusal.IDLE,
        )


class RefusalObserver(Protocol):
    """What the receiver reports for the metrics (appliance.api.metrics.Metrics implements it)."""

    def on_dicom_refusal(self, reason: str) -> None: ...


class NoRefusalObserver:
    def on_dicom_refusal(self, reason: str) -> None:
        pass


class RefusalLog:
    """Every refusal and timeout, logged through the one throttle (appliance.log_throttle): the first of each
    kind at once with the peer's host and validated AE title, then a count per minute; each counted in the
    metrics as it happens."""

    def __init__(self, config: DicomConfig, observer: RefusalObserver) -> None:
        self._config = config
        self._observer = observer
        self._lines = LogThrottle(log, logging.WARNING)
        self._probes = LogThrottle(log, logging.INFO)  # connections that close unasked: port checks, monitors

    def report(self, refusal: Refusal, host: str, calling: str | None = None, detail: str = "") -> None:
        self._observer.on_dicom_refusal(refusal.label)
        what = "association aborted" if refusal.aborts else "connection refused"
        peer = host + (f", calling AE {printable(calling)}" if calling is not None else "")
        why = refusal.sentence.format(c=self._config) + (f" ({detail})" if detail else "")
        lines = self._probes if refusal is Refusal.CLOSED else self._lines
        lines.log(f"DICOM {what} ({refusal.label})", "DICOM %s (%s) from %s: %s", what, refusal.label, peer, why)

    def close(self) -> None:
        self._lines.close()
        self._probes.close()


def address(value: str) -> Address | None:
    try:
        parsed = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped  # an IPv4 scanner seen through a dual-stack socket
    return parsed


def _resolve(host: str) -> frozenset[Address]:
    """A caller's host as addresses: a literal address, or a name resolved once at start."""
    literal = address(host)
    if literal is not None:
        return frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        # A DNS hiccup at boot must not keep the folder and gRPC down: this caller is refused until a restart.
        log.error("dicom.allowed: the host %r does not resolve (%s); that scanner is refused", host, e.strerror or e)
        return frozenset()
    return frozenset(a for info in infos if (a := address(str(info[4][0]))) is not None)


class Callers:
    """The AE titles allowed to send, each from any host or from its own (names resolved once, at start)."""

    def __init__(self, config: DicomConfig) -> None:
        self._called = config.ae_title.strip()
        self._callers: dict[str, list[frozenset[Address] | None]] = {}
        for caller in config.allowed:
            hosts = _resolve(caller.host) if caller.host else None
            self._callers.setdefault(caller.ae_title.strip(), []).append(hosts)

    @property
    def titles(self) -> list[str]:
        return list(self._callers)

    def refusal(self, called: str, calling: str, host: str) -> Refusal | None:
        """Why this request may not be accepted from this host, or None."""
        if calling not in self._callers:
            return Refusal.CALLING_AE
        if called != self._called:
            return Refusal.CALLED_AE
        peer = address(host)
        if not any(hosts is None or peer in hosts for hosts in self._callers[calling]):
            return Refusal.AE_HOST
        return None


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, from accept to close."""

    host: str  # the peer's address, as counted per host
    sock: socket.socket
    calling: str | None = None  # the calling AE title, once its association is accepted
    evicted: bool = False  # closed by the front for a newer connection while it had sent no whole request


class Admission:
    """The counts behind the caps, under one lock. A connection counts for its host from accept to close;
    until its association request is accepted it is pending (never counted as an association), and past
    max_pending the oldest pending one is closed for the newcomer, so that peers which connect and stay
    silent can hold no scanner out, however many hosts they come from."""

    def __init__(self, config: DicomConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._pending: dict[Connection, None] = {}  # in arrival order
        self._per_host: Counter[str] = Counter()
        self._per_ae: Counter[str] = Counter()
        self._accepted = 0

    def open(self, host: str, sock: socket.socket) -> tuple[Connection | None, Connection | None]:
        """The new connection (None: its host is at its cap), and the pending one evicted for it, if any."""
        key = str(address(host) or host)
        with self._lock:
            if self._per_host[key] >= self._config.max_associations_per_host:
                return None, None
            evicted, woken = None, None
            if len(self._pending) >= self._config.max_pending:
                evicted = next(iter(self._pending))
                del self._pending[evicted]
                evicted.evicted = True
                woken = evicted.sock  # read under the lock: ``wrap`` may be swapping it
            conn = Connection(key, sock)
            self._pending[conn] = None
            self._per_host[key] += 1
        if woken is not None:
            _wake(woken)
        return conn, evicted

    def wrap(self, conn: Connection, sock: socket.socket) -> bool:
        """Make ``sock`` (the connection's TLS socket, which took over its descriptor) the one an eviction
        shuts; False where the connection was evicted already, its wake spent on the socket it replaces."""
        with self._lock:
            conn.sock = sock
            return not conn.evicted

    def admit(self, conn: Connection, calling: str) -> Refusal | None:
        """Count an allowed caller's association, or say which cap it would pass."""
        with self._lock:
            if conn.evicted:
                return Refusal.PENDING_FULL
            if self._per_ae[calling] >= self._config.max_associations_per_ae:
                return Refusal.AE_LIMIT
            if self._accepted >= self._config.max_associations:
                return Refusal.LIMIT
            del self._pending[conn]
            conn.calling = calling
            self._per_ae[calling] += 1
            self._accepted += 1
        return None

    def close(self, conn: Connection) -> None:
        with self._lock:
            self._pending.pop(conn, None)
            if conn.calling is not None:
                self._per_ae[conn.calling] -= 1
                self._accepted -= 1
                if not self._per_ae[conn.calling]:
                    del self._per_ae[conn.calling]
            self._per_host[conn.host] -= 1
            if not self._per_host[conn.host]:
                del self._per_host[conn.host]

    def counts(self) -> tuple[int, int]:
        """(pending, accepted) now."""
        with self._lock:
            return len(self._pending), self._accepted


def _wake(sock: socket.socket) -> None:
    """End a connection another thread is reading: its read returns at once with nothing."""
    with contextlib.suppress(OSError):  # closed already
        # The plain socket's shutdown, also under TLS: an SSLSocket's own drops its TLS state under the reader.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
