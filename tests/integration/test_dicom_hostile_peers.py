"""Hostile peers on the real daemon's DICOM port (issue 19), with raw sockets: silent half-sent requests from
many hosts, a request declaring 4 GiB followed by 1 GiB, an allowed AE title holding its cap or sending a
C-STORE of 1 GiB past limits.max_file_mb. A real scanner
(DCMTK's echoscu and storescu) is served throughout, the daemon's memory stays bounded, and every refusal is
logged and counted. Several hosts are 127.0.0.x: Linux routes all of 127/8 on loopback."""

from __future__ import annotations

import select
import socket
import sqlite3
import struct
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.integration.conftest import Daemon, free_port
from tests.peers import needs
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.dicom_wire import p_data_tf, rejection, store_command
from tests.waiting import eventually

pytestmark = needs("storescu", "echoscu")

SCANNER, HOG, APPLIANCE = "SCANNER", "HOG", "APPLIANCE"
CT = Path(str(get_testdata_file("CT_small.dcm")))
_MIB = 1024 * 1024
CT_CLASS = str(dcmread(CT, stop_before_pixels=True).SOPClassUID)


def _daemon(
    make_daemon: type[Daemon], limits: dict[str, object] | None = None, **dicom: object
) -> tuple[Daemon, int, int]:
    """The real daemon receiving from SCANNER (bound to 127.0.0.1) and HOG (from any host); its DICOM and
    metrics ports."""
    port, metrics = free_port(), free_port()
    allowed = [{"ae_title": SCANNER, "host": "127.0.0.1"}, {"ae_title": HOG}]
    d = make_daemon(
        dicom={"enabled": True, "port": port, "ae_title": APPLIANCE, "allowed": allowed, **dicom},
        server={"metrics_port": metrics},
        **({"limits": limits} if limits else {}),
    )
    d.start()
    return d, port, metrics


def _scanner_sends(port: int) -> None:
    """A real scanner's C-ECHO and C-STORE, from 127.0.0.1 as SCANNER: both must succeed."""
    echo = echoscu("127.0.0.1", port, SCANNER, APPLIANCE)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    sent = storescu([CT], "127.0.0.1", port, SCANNER, APPLIANCE)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _refusals(metrics: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("appliance_dicom_refusals_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


def _until(what: str, check: Callable[[], bool], d: Daemon, timeout: float = 120.0) -> None:
    eventually(check, what, timeout=timeout, every=0.1, context=lambda: d.log()[-4000:])


def _silent(host: str, port: int) -> socket.socket:
    """A connection from ``host`` that sends 4 of an A-ASSOCIATE-RQ header's 6 bytes and goes silent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"\x01\x00\x00\x00")
    return sock


def _closed(sock: socket.socket) -> bool:
    """Whether the daemon has closed it (it sends a silent peer nothing), without waiting."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _memory_kib(pid: int) -> tuple[int, int]:
    """The process's (VmRSS, VmHWM) in KiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class _Attack:
    """``attempt`` again and again from a thread of its own while a real scanner sends, sampling the daemon's
    memory: each attempt offers up to 1 GiB and returns what the kernel took before the daemon ended it."""

    def __init__(self, d: Daemon, attempt: Callable[[Callable[[], None]], int]) -> None:
        assert d.proc is not None
        self.d, self.pid, self._attempt = d, d.proc.pid, attempt
        self.rss_before, self.hwm_before = _memory_kib(self.pid)
        self.peak = self.rss_before
        self.offered: list[int] = []

    def sample(self) -> None:
        self.peak = max(self.peak, _memory_kib(self.pid)[0])

    def while_the_scanner_sends(self, port: int) -> None:
        stop, first = threading.Event(), threading.Event()

        def attack() -> None:
            while not stop.is_set():
                self.offered.append(self._attempt(self.sample))
                self.sample()
                first.set()

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            assert first.wait(120), "the first attempt was never ended by the daemon"
            attempts_before = len(self.offered)
            _scanner_sends(port)
            _until("the attack went on while the scanner sent", lambda: len(self.offered) > attempts_before, self.d)
        finally:
            stop.set()
            attacker.join(timeout=120)
        assert not attacker.is_alive()
        self.rss_after, self.hwm_after = _memory_kib(self.pid)

    def assert_memory_bounded(self) -> None:
        """A behaviour bound, not a timing: the daemon never held what was declared or offered."""
        assert (self.peak - self.rss_before) < 100 * 1024, (self.rss_before, self.peak)
        assert (self.hwm_after - self.hwm_before) < 100 * 1024, (self.hwm_before, self.hwm_after)

    def figures(self) -> str:
        return (
            f"{len(self.offered)} attempts, at most {max(self.offered) / _MIB:.1f} MiB taken by the kernel before "
            f"the daemon ended one; daemon RSS before {self.rss_before / 1024:.0f} MiB, peak sampled "
            f"{self.peak / 1024:.0f} MiB, after {self.rss_after / 1024:.0f} MiB; VmHWM "
            f"{self.hwm_before / 1024:.0f} -> {self.hwm_after / 1024:.0f} MiB"
        )


def test_silent_half_requests_from_many_hosts_shut_out_no_scanner_and_are_closed(make_daemon: type[Daemon]) -> None:
    # Defaults: 4 connections per host, 16 pending, 8 associations. The request deadline is long enough
    # that the attackers still hold their connections while the scanner sends.
    d, port, metrics = _daemon(make_daemon, request_timeout_s=12)
    hosts = [f"127.0.0.{n}" for n in range(2, 10)]
    attackers = [_silent(host, port) for host in hosts for _ in range(5)]  # 40: 5 per host, 8 hosts
    try:
        # Each host's fifth is refused at accept (per host), and of the 32 left the 16 oldest are closed for
        # newer ones (pending): 24 closed, 16 held, none counted as an association.
        _until("24 of the 40 silent connections closed at once", lambda: sum(map(_closed, attackers)) == 24, d)
        # Its first connection closes the oldest pending attacker; once admitted it is pending no more, and its
        # second finds that slot free.
        _scanner_sends(port)
        held = [sock for sock in attackers if not _closed(sock)]
        assert len(held) == 15, "the scanner was served while the attackers held their connections"
        assert d.status().ready
        # The rest are closed at the request deadline.
        _until("every silent connection closed", lambda: all(map(_closed, held)), d)
    finally:
        for sock in attackers:
            sock.close()
    counts = _refusals(metrics)
    assert counts == {"host_limit": 8.0, "pending_full": 17.0, "request_timeout": 15.0}, counts
    log = d.log()
    for line in (
        "DICOM connection refused (host_limit) from 127.0.0.2: more than dicom.max_associations_per_host = 4 open",
        "DICOM connection refused (pending_full) from 127.0.0.2: the oldest of dicom.max_pending = 16",
        "DICOM connection refused (request_timeout) from 127.0.0.",
    ):
        assert line in log, line
    # Throttled: the first of each kind, the rest counted in one line a minute.
    assert log.count("DICOM connection refused (pending_full)") == 1
    print(f"\nslowloris: the daemon's refusal lines:\n{_lines(log, 'DICOM connection refused')}")


def test_a_request_declaring_4_gib_is_refused_unread_and_memory_stays_bounded(make_daemon: type[Daemon]) -> None:
    d, port, metrics = _daemon(make_daemon)
    chunk = b"\x00" * (64 * 1024)

    def oversized_request(sample: Callable[[], None]) -> int:
        # One A-ASSOCIATE-RQ header declaring 0xFFFFFFF0 bytes, then up to 1 GiB sent lazily, stopping when the
        # daemon closes.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(60)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                return 0  # refused or closed by the daemon: what is expected
            return _flood(sock, struct.pack(">BxL", 0x01, 0xFFFFFFF0), chunk, sample)

    attack = _Attack(d, oversized_request)
    attack.while_the_scanner_sends(port)
    assert max(attack.offered) < 1 << 30, "the daemon read a whole GiB instead of closing at the header"
    attack.assert_memory_bounded()
    assert _refusals(metrics).get("request_too_large", 0) >= 2
    line = (
        "DICOM connection refused (request_too_large) from 127.0.0.2: an A-ASSOCIATE-RQ longer than "
        "dicom.max_request_kb = 64, refused unread (4294967280 bytes declared)"
    )
    assert line in d.log()
    print(f"\noversized PDU: {attack.figures()}\n{_lines(d.log(), 'DICOM connection refused')}")


def test_an_allowed_ae_holding_its_cap_shuts_out_no_other_caller(make_daemon: type[Daemon]) -> None:
    d, port, metrics = _daemon(make_daemon)
    held = [_associate(port, HOG, "127.0.0.2") for _ in range(4)]  # dicom.max_associations_per_ae
    try:
        assert all(assoc.is_established for assoc in held)
        # From another host: the AE title's cap, not the host's. Rejected transient: local limit exceeded.
        assert rejection(port, HOG, APPLIANCE, "127.0.0.3") == (2, 3, 2)
        _scanner_sends(port)
    finally:
        for assoc in held:
            assoc.release()
    assert _refusals(metrics) == {"ae_limit": 1.0}
    assert (
        "DICOM connection refused (ae_limit) from 127.0.0.3, calling AE 'HOG': this AE title holds "
        "dicom.max_associations_per_ae = 4 already" in d.log()
    )


def test_an_allowed_ae_s_store_past_max_file_mb_is_aborted_as_it_arrives_and_memory_stays_bounded(
    make_daemon: type[Daemon],
) -> None:
    d, port, metrics = _daemon(make_daemon, limits={"max_file_mb": 2})

    def endless_store(sample: Callable[[], None]) -> int:
        # HOG, an allowed AE title, associates properly and starts a C-STORE whose data set goes on for up to
        # 1 GiB in 256 KiB P-DATA-TF PDUs, never the last fragment.
        assoc = _associate(port, HOG, "127.0.0.2", storage=True)
        assert assoc.is_established
        cx = next(int(c.context_id or 0) for c in assoc.accepted_contexts if c.abstract_syntax == CT_CLASS)
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        assert raw is not None
        fragment = p_data_tf(cx, 0x00, b"\x00" * (256 * 1024))
        sent = _flood(raw, store_command(cx, CT_CLASS, generate_uid()), fragment, sample)
        try:
            eventually(lambda: assoc.is_aborted, "HOG's association aborted by the daemon")
        finally:
            assoc.abort()
        return sent

    attack = _Attack(d, endless_store)
    attack.while_the_scanner_sends(port)
    [scored] = d.collect(1)  # the scanner's instance
    assert scored.sop_instance_uid == str(dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
    assert max(attack.offered) < 64 * _MIB, "the daemon took far more than limits.max_file_mb before the abort"
    attack.assert_memory_bounded()
    assert _refusals(metrics).get("message_too_large", 0) >= 2
    line = (
        "DICOM association aborted (message_too_large) from 127.0.0.2, calling AE 'HOG': a message (a C-STORE's "
        "data set) past limits.max_file_mb, or another message past 64 KiB, refused unread from there "
        "(more than 2097152 bytes in one message)"
    )
    log = d.log()
    assert line in log
    assert log.count("DICOM association aborted (message_too_large)") == 1  # throttled: one line a minute
    # Nothing of HOG's was kept: the spool empties once the scanner's instance is scored, and the journal holds
    # that instance only.
    spool = d.root / "data" / "spool"
    _until("the spool emptied", lambda: not list(spool.iterdir()), d)
    d.stop()
    with sqlite3.connect(d.root / "data" / "journal.sqlite3") as db:
        inputs = db.execute("SELECT source, state, instance_uid FROM inputs").fetchall()
    assert inputs == [("dicom", "scored", scored.sop_instance_uid)]
    print(f"\noversized C-STORE by an allowed AE: {attack.figures()}\n{_lines(log, 'DICOM association aborted')}")


def _associate(port: int, calling: str, host: str, storage: bool = False) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    if storage:
        ae.add_requested_context(CT_CLASS)
    return ae.associate("127.0.0.1", port, ae_title=APPLIANCE, bind_address=(host, 0))


def _flood(sock: socket.socket, head: bytes, chunk: bytes, sample: Callable[[], None]) -> int:
    """``head``, then ``chunk`` after ``chunk`` up to 1 GiB, sampling every 16 MiB, until the daemon ends the
    connection (what is expected); how many bytes of chunks went."""
    sent = 0
    try:
        sock.sendall(head)
        while sent < 1 << 30:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent % (16 * _MIB) == 0:
                sample()
    except OSError:
        pass  # ended by the daemon
    return sent


def _lines(log: str, words: str) -> str:
    return "\n".join(line for line in log.splitlines() if words in line)
