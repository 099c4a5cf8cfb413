"""The DICOM receiver in-process: a real SCP on loopback in front of the real intake, stages and journal
(pipeline-test model), with real SCUs: pynetdicom AEs, and DCMTK's echoscu/storescu where installed."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, N_EVENT_REPORT_RQ
from pynetdicom.dimse_primitives import C_ECHO, N_EVENT_REPORT
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.api.certs import make_server, make_terminal
from appliance.config import DicomCaller, DicomConfig
from appliance.domain.errors import ConfigError
from appliance.domain.faults import STORAGE, Faults
from appliance.domain.result import Outcome
from appliance.files.durable import TEMPORARY_SUFFIX
from appliance.intake.dicom_front import MAX_PDU
from appliance.intake.dicom_receiver import OUT_OF_RESOURCES, SUCCESS, DicomReceiver
from appliance.intake.intake import Intake
from appliance.journal.journal import InputRow, Journal
from tests.in_process import ScoringCore, results_of, scoring_core
from tests.peers import needs
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.dicom_wire import p_data_tf, rejection, store_command
from tests.waiting import eventually

HOST = "127.0.0.1"
SCANNER = "CT01"
APPLIANCE = "APPLIANCE"


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return Path(str(path))


CT = _testdata("CT_small.dcm")
MR = _testdata("MR_small.dcm")
J2K = _testdata("JPEG2000.dcm")  # JPEG 2000, sent as it is encoded
JPEG = _testdata("SC_jpeg_no_color_transform.dcm")  # JPEG Baseline: what storescu -xy proposes


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ScoringCore]:
    with scoring_core(tmp_path) as built:
        yield built


def _spool(core: ScoringCore) -> Path:
    return core.config.storage.data_dir / "spool"


Receive = Callable[..., DicomReceiver]


@pytest.fixture
def receive(core: ScoringCore) -> Iterator[Receive]:
    """Start a receiver on HOST, port 0, allowing SCANNER unless told otherwise; stopped after."""
    started: list[DicomReceiver] = []

    def start(
        *,
        intake: Intake | None = None,
        faults: Faults | None = None,
        min_free_mb: int = 0,
        max_file_mb: float = 2048,
        **fields: Any,
    ) -> DicomReceiver:
        fields.setdefault("allowed", [DicomCaller(ae_title=SCANNER)])
        fields.setdefault("timeout_s", 20)
        fields.setdefault("host", HOST)
        config = DicomConfig(enabled=True, ae_title=APPLIANCE, port=0, **fields)
        spool, faults = _spool(core), faults or core.faults
        receiver = DicomReceiver(
            config, intake or core.intake, spool, faults, min_free_mb, observer=core.metrics, max_file_mb=max_file_mb
        )
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


# --- SCU side -------------------------------------------------------------------------------------------


def _associate(
    port: int,
    files: tuple[Path, ...] = (),
    *,
    calling: str = SCANNER,
    called: str = APPLIANCE,
    tls: ssl.SSLContext | None = None,
    source: str = HOST,
) -> Association:
    """A pynetdicom SCU proposing Verification and each file's SOP class in the file's own transfer syntax,
    from ``source`` (another loopback address is another host: Linux routes all of 127/8)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    if tls is not None:
        return ae.associate(HOST, port, ae_title=called, tls_args=(tls, "localhost"), bind_address=(source, 0))
    return ae.associate(HOST, port, ae_title=called, bind_address=(source, 0))


def _store(port: int, *files: Path, **kwargs: Any) -> list[int]:
    """Send the files on one association (each read and sent without decoding); their C-STORE statuses."""
    assoc = _associate(port, files, **kwargs)
    assert assoc.is_established, "the association was not accepted"
    try:
        return [int(assoc.send_c_store(path).get("Status", -1)) for path in files]
    finally:
        assoc.release()


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _as_received(path: Path) -> bytes:
    """What the receiver must spool for this file: the data set exactly as the SCU sent it (pynetdicom sends
    a file's bytes undecoded), behind a file meta made only of the request and the implementation's UID."""
    data = path.read_bytes()
    meta = read_file_meta_info(path)
    body = data[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
    fresh = FileMetaDataset()
    fresh.FileMetaInformationGroupLength = 0
    fresh.FileMetaInformationVersion = b"\x00\x01"
    fresh.MediaStorageSOPClassUID = meta.MediaStorageSOPClassUID
    fresh.MediaStorageSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    fresh.TransferSyntaxUID = meta.TransferSyntaxUID
    fresh.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    fresh.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    return b"\x00" * 128 + b"DICM" + encode_file_meta(fresh) + body


def _inputs(journal: Journal) -> list[InputRow]:
    rows: list[InputRow] = []
    while (row := journal.get_input(len(rows) + 1)) is not None:
        rows.append(row)
    return rows


def _spool_empties(core: ScoringCore) -> None:
    """Spooled copies are deleted once scored (after the commit): wait for it."""
    eventually(
        lambda: sorted(p.name for p in _spool(core).iterdir()),
        "the spool emptied",
        until=lambda left: not left,
        timeout=30,
    )


def _duplicates(core: ScoringCore) -> float:
    return core.metrics.registry.get_sample_value("appliance_duplicates_total") or 0.0


# --- receipt --------------------------------------------------------------------------------------------


def test_echo_and_a_store_answered_only_once_spooled_and_journaled_then_scored(
    core: ScoringCore, receive: Receive
) -> None:
    receiver = receive()
    assert receiver.alive()
    assoc = _associate(receiver.port, (CT,))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == SUCCESS
        status = assoc.send_c_store(CT).Status
        # As the answer arrives: journaled, and its spooled copy whole (or already read, scored and deleted).
        [row] = _inputs(core.journal)
        spooled = Path(str(row.path))
        on_disk = spooled.read_bytes() if spooled.exists() else None
        scored_already = bool(core.journal.results_for_input(row.id))
    finally:
        assoc.release()
    assert status == SUCCESS
    expected = _as_received(CT)
    assert row.source == "dicom" and row.file_name == f"{_sop_uid(CT)}.dcm"
    assert spooled.parent == _spool(core) and spooled.name.startswith("dicom-") and spooled.suffix == ".dcm"
    assert row.content_hash == blake3.blake3(expected).hexdigest() and row.size == len(expected)
    assert on_disk == expected or (on_disk is None and scored_already)
    [result] = results_of(core.journal, row.id)
    assert result.outcome is Outcome.SCORED and result.input.source == "dicom"
    assert result.ids.sop_instance_uid == _sop_uid(CT)
    _spool_empties(core)


def test_compressed_instances_are_stored_as_sent_in_their_own_transfer_syntax(
    core: ScoringCore, receive: Receive
) -> None:
    receiver = receive()
    assert _store(receiver.port, MR, J2K) == [SUCCESS, SUCCESS]
    rows = _inputs(core.journal)
    assert [r.file_name for r in rows] == [f"{_sop_uid(MR)}.dcm", f"{_sop_uid(J2K)}.dcm"]
    for row, sent in zip(rows, (MR, J2K), strict=True):
        # The JPEG 2000 data set spooled undecoded, its file meta naming JPEG 2000: the reader decodes it.
        assert row.content_hash == blake3.blake3(_as_received(sent)).hexdigest()
        [result] = results_of(core.journal, row.id)
        assert result.outcome is Outcome.SCORED, result.rejection
    _spool_empties(core)


def test_the_same_instance_sent_twice_is_scored_once(core: ScoringCore, receive: Receive) -> None:
    receiver = receive()
    assert _store(receiver.port, CT) == [SUCCESS]
    assert _store(receiver.port, CT) == [SUCCESS]  # a re-send, on a new association: answered, not scored
    first, again = _inputs(core.journal)
    assert first.content_hash == again.content_hash and again.duplicate_of == first.id
    assert len(results_of(core.journal, first.id)) == 1
    assert core.journal.results_for_input(again.id) == [] and _duplicates(core) == 1.0
    _spool_empties(core)


def test_the_same_instance_sent_again_in_another_encoding_is_scored_once(
    core: ScoringCore, receive: Receive, tmp_path: Path
) -> None:
    """Other bytes (implicit VR, as another sender or a gateway would send it), the same SOP Instance UID."""
    receiver = receive()
    implicit = tmp_path / "ct-implicit.dcm"
    ds = dcmread(CT)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, enforce_file_format=True)
    assert _store(receiver.port, CT) == [SUCCESS]
    assert _store(receiver.port, implicit) == [SUCCESS]
    first, again = _inputs(core.journal)
    assert first.content_hash != again.content_hash and again.duplicate_of == first.id
    assert len(results_of(core.journal, first.id)) == 1
    assert core.journal.results_for_input(again.id) == [] and _duplicates(core) == 1.0
    _spool_empties(core)


# --- who may send ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("STRANGER", APPLIANCE, (1, 1, 3)),  # rejected permanent, by the service user: calling AE not recognised
        (SCANNER, "SOMEONE-ELSE", (1, 1, 7)),  # ... called AE title not recognised
        ("FAR01", APPLIANCE, (1, 1, 3)),  # a known AE title, from another host than its own
    ],
)
def test_who_may_not_send_is_rejected_at_association_with_the_standard_reason(
    core: ScoringCore, receive: Receive, calling: str, called: str, reason: tuple[int, int, int]
) -> None:
    allowed = [
        DicomCaller(ae_title=SCANNER),
        DicomCaller(ae_title="FAR01", host="192.0.2.10"),
        DicomCaller(ae_title="NEAR01", host=HOST),
    ]
    receiver = receive(allowed=allowed)
    assert rejection(receiver.port, calling, called) == reason
    assert _store(receiver.port, CT, calling="NEAR01") == [SUCCESS]  # a host-bound caller from its host
    assert [r.source for r in _inputs(core.journal)] == ["dicom"]


def test_more_associations_than_the_limit_are_refused(receive: Receive) -> None:
    receiver = receive(max_associations=2)
    held = [_associate(receiver.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        # Rejected transient, by the service provider (presentation): local limit exceeded.
        assert rejection(receiver.port, SCANNER, APPLIANCE) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()


def _refusals(core: ScoringCore, reason: str) -> float:
    return core.metrics.registry.get_sample_value("appliance_dicom_refusals_total", {"reason": reason}) or 0.0


def _from(host: str, port: int) -> Association:
    """A pynetdicom SCU association (Verification) from another loopback address (Linux routes all 127/8)."""
    ae = AE(ae_title=SCANNER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    return ae.associate(HOST, port, ae_title=APPLIANCE, bind_address=(host, 0))


def _receiver_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The receiver's log lines (the test's own SCUs log through pynetdicom)."""
    return [r.getMessage() for r in caplog.records if r.name == "appliance.intake.dicom_receiver"]


def _read_to_end(sock: socket.socket) -> bytes:
    """What the receiver sends until it closes (a reset counts as a close)."""
    sock.settimeout(60)  # a bound on a broken test, not a timing: the receiver closes well before
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_connections_past_the_cap_per_host_are_refused_and_other_hosts_served(
    core: ScoringCore, receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receive(max_associations_per_host=2)
    held = [_associate(receiver.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
            third = _associate(receiver.port)  # closed at accept, before any PDU: no association, no reject
            assert not third.is_established and not third.is_rejected
            other = _from("127.0.0.2", receiver.port)
            assert other.is_established and other.send_c_echo().Status == SUCCESS
            other.release()
    finally:
        for assoc in held:
            assoc.release()
    assert _refusals(core, "host_limit") == 1.0
    assert _receiver_lines(caplog) == [
        "DICOM connection refused (host_limit) from 127.0.0.1: more than dicom.max_associations_per_host = 2 open"
    ]


def test_one_ae_title_at_its_cap_leaves_room_for_another(core: ScoringCore, receive: Receive) -> None:
    receiver = receive(allowed=[DicomCaller(ae_title=SCANNER), DicomCaller(ae_title="CT02")], max_associations_per_ae=2)
    held = [_associate(receiver.port) for _ in range(2)]
    try:
        assert rejection(receiver.port, SCANNER, APPLIANCE) == (2, 3, 2)  # rejected transient: local limit exceeded
        assert _store(receiver.port, CT, calling="CT02") == [SUCCESS]
    finally:
        for assoc in held:
            assoc.release()
    assert _refusals(core, "ae_limit") == 1.0
    # Its count goes with its associations' threads, a moment after each SCU's release has returned.
    again = eventually(
        lambda: _associate(receiver.port), "the AE title's count released", until=lambda assoc: assoc.is_established
    )
    assert again.send_c_echo().Status == SUCCESS
    again.release()


def test_a_request_past_max_request_kb_is_refused_unread_with_an_abort(core: ScoringCore, receive: Receive) -> None:
    receiver = receive()
    with socket.create_connection((HOST, receiver.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BxL", 0x01, 64 * 1024 + 1) + b"\x00" * 1024)
        # A-ABORT, from the service provider (2), invalid PDU parameter value (6); then the close.
        assert _read_to_end(sock) == bytes.fromhex("07 00 00000004 00 00 02 06")
    assert _refusals(core, "request_too_large") == 1.0
    assert _store(receiver.port, CT) == [SUCCESS]


def test_a_first_pdu_that_is_no_request_is_answered_with_an_abort(core: ScoringCore, receive: Receive) -> None:
    receiver = receive()
    with socket.create_connection((HOST, receiver.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type 0x47: unrecognised
        assert _read_to_end(sock) == bytes.fromhex("07 00 00000004 00 00 02 01")
    assert _refusals(core, "not_a_request") == 1.0


def test_a_silent_connection_is_closed_at_the_request_deadline(
    core: ScoringCore, receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receive(request_timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        with socket.create_connection((HOST, receiver.port), timeout=10) as sock:
            sock.sendall(b"\x01\x00\x00")  # half a header, then nothing
            assert _read_to_end(sock) == b""
        assert _store(receiver.port, CT) == [SUCCESS]
    assert _refusals(core, "request_timeout") == 1.0
    assert _receiver_lines(caplog) == [
        "DICOM connection refused (request_timeout) from 127.0.0.1: no whole A-ASSOCIATE-RQ within "
        "dicom.request_timeout_s = 0.5"
    ]


@pytest.mark.parametrize(
    ("declared", "sent", "reason"),
    [
        (MAX_PDU + 1, b"", "pdu_too_large"),  # a P-DATA-TF past the advertised maximum: refused unread
        (1024, b"\x00" * 10, "network_timeout"),  # one that stops half-way: given up at timeout_s
    ],
)
def test_an_accepted_association_is_aborted_on_a_pdu_too_long_or_too_slow(
    core: ScoringCore, receive: Receive, declared: int, sent: bytes, reason: str
) -> None:
    receiver = receive(timeout_s=1)
    assoc = _associate(receiver.port)
    assert assoc.is_established
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert raw is not None
    raw.sendall(struct.pack(">BxL", 0x04, declared) + sent)  # the SCU's own reactor reads the A-ABORT
    _until("the association was not aborted", lambda: assoc.is_aborted)
    assert _refusals(core, reason) == 1.0
    assert _store(receiver.port, CT) == [SUCCESS]


def _store_command(context_id: int, path: Path) -> bytes:
    """A C-STORE-RQ's whole command set for this file's instance; the test sends the data set."""
    ds = dcmread(path, stop_before_pixels=True)
    return store_command(context_id, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _storing(port: int) -> tuple[Association, int, socket.socket]:
    """An association accepted for CT's storage, its context id, and its raw socket for PDUs of the test's own."""
    assoc = _associate(port, (CT,))
    assert assoc.is_established
    return assoc, _context_id(assoc, CT), _raw(assoc)


def _context_id(assoc: Association, path: Path) -> int:
    sop_class = str(dcmread(path, stop_before_pixels=True).SOPClassUID)
    return next(int(cx.context_id or 0) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)


def _raw(assoc: Association) -> socket.socket:
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert raw is not None
    return raw


def _offer(sock: socket.socket, pdu: bytes, times: int) -> int:
    """Send the PDU up to ``times`` times, stopping where the receiver closes; the bytes it took."""
    sent = 0
    try:
        for _ in range(times):
            sock.sendall(pdu)
            sent += len(pdu)
    except OSError:
        pass  # closed by the receiver: what is expected
    return sent


def _until(what: str, check: Callable[[], bool]) -> None:
    eventually(check, what)


@pytest.mark.parametrize(
    ("command", "fragment", "limit"),
    [
        (True, 0x00, 1024 * 1024),  # a C-STORE's data set past limits.max_file_mb (1)
        (False, 0x01, 64 * 1024),  # a command set that never ends: held in memory, so held to 64 KiB
    ],
)
def test_a_message_past_its_cap_is_aborted_as_it_arrives_and_leaves_nothing(
    core: ScoringCore,
    receive: Receive,
    caplog: pytest.LogCaptureFixture,
    command: bool,
    fragment: int,
    limit: int,
) -> None:
    receiver = receive(max_file_mb=1)
    assoc, cx, raw = _storing(receiver.port)
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        if command:
            raw.sendall(_store_command(cx, CT))
        # Up to 64 MiB in 256 KiB fragments, never the last: the receiver ends it past its cap.
        sent = _offer(raw, p_data_tf(cx, fragment, b"\x00" * (256 * 1024)), 256)
        _until("the association was not aborted", lambda: assoc.is_aborted)
    assert sent < 16 * 1024 * 1024, "the receiver took far more than its cap before the abort"
    assert _refusals(core, "message_too_large") == 1.0
    assert _receiver_lines(caplog) == [
        f"DICOM association aborted (message_too_large) from 127.0.0.1, calling AE '{SCANNER}': a message "
        "(a C-STORE's data set) past limits.max_file_mb, or another message past 64 KiB, refused unread from "
        f"there (more than {limit} bytes in one message)"
    ]
    _until("the part written was not removed", lambda: not list(_spool(core).iterdir()))
    assert _inputs(core.journal) == []
    assert _store(receiver.port, CT) == [SUCCESS]  # and a store within the cap is served


def _echoes(context_id: int, count: int, request: C_ECHO | N_EVENT_REPORT | None = None) -> bytes:
    """One P-DATA-TF packed with ``count`` whole C-ECHO-RQs (or ``request``s; a command set each, some 74 bytes):
    what no scanner sends, which waits for each answer, and what pynetdicom would queue one by one."""
    if request is None:
        request = C_ECHO()
        request.AffectedSOPClassUID = Verification
    request.MessageID = 1
    message = C_ECHO_RQ() if isinstance(request, C_ECHO) else N_EVENT_REPORT_RQ()
    message.primitive_to_message(request)
    [(_, command)] = next(iter(message.encode_msg(context_id, MAX_PDU))).presentation_data_value_list
    item = struct.pack(">LB", len(command) + 1, context_id) + bytes(command)  # its control byte: 3, whole
    return struct.pack(">BxL", 0x04, count * len(item)) + item * count


def test_an_allowed_ae_sending_messages_faster_than_they_are_answered_is_aborted(
    core: ScoringCore, receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    """Each message is within its cap, but every whole one waits in pynetdicom's queue for the association's
    thread: unbounded, it grew by 3 MiB a second (1.2 GiB after five minutes) and the association lived on."""
    receiver = receive()
    assoc = _associate(receiver.port)
    assert assoc.is_established
    cx = next(int(c.context_id or 0) for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
    burst = _echoes(cx, 14_000)  # under 1 MiB, the largest PDU the receiver takes
    assert len(burst) <= MAX_PDU + 6
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        sent = _offer(_raw(assoc), burst, 64)  # 896,000 requests, the answers left to the SCU's own thread
        _until("the association was not aborted", lambda: assoc.is_aborted)
    assert sent < 64 * len(burst), "the receiver took every request"
    assert _refusals(core, "too_many_messages") == 1.0
    [line] = _receiver_lines(caplog)
    assert line.startswith(
        f"DICOM association aborted (too_many_messages) from 127.0.0.1, calling AE '{SCANNER}': messages sent "
        "on without waiting for their answers (this receiver negotiates one at a time), refused unread from "
        "there ("
    )
    assert line.endswith(" waiting, more than 8)")
    assert _store(receiver.port, CT) == [SUCCESS]  # and a scanner that waits for its answers is served


def test_a_message_this_receiver_does_not_serve_ends_the_association_before_pynetdicom_serves_the_next(
    core: ScoringCore, receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom serves each N-EVENT-REPORT-RQ on a thread of its own as it arrives, whatever was negotiated:
    a P-DATA packed with them would start a thread for each."""
    receiver = receive()
    assoc = _associate(receiver.port)
    assert assoc.is_established
    cx = next(int(c.context_id or 0) for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
    report = N_EVENT_REPORT()
    report.AffectedSOPClassUID = Verification
    report.AffectedSOPInstanceUID = "1.2.3"
    report.EventTypeID = 1
    threads_before = threading.active_count()
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        _offer(_raw(assoc), _echoes(cx, 10_000, report), 4)
        _until("the association was not aborted", lambda: assoc.is_aborted)
    assert _refusals(core, "unexpected_message") == 1.0
    assert threading.active_count() < threads_before + 10  # at most the one pynetdicom started first
    assert _receiver_lines(caplog) == [
        f"DICOM association aborted (unexpected_message) from 127.0.0.1, calling AE '{SCANNER}': a message this "
        "receiver does not serve (it takes C-ECHO and C-STORE requests only), refused from there (a "
        "N_EVENT_REPORT_RQ)"
    ]
    assert _store(receiver.port, CT) == [SUCCESS]


@pytest.mark.parametrize("end", ["abort", "close"])
def test_a_store_ended_half_way_by_the_scanner_leaves_nothing_in_the_spool(
    core: ScoringCore, receive: Receive, end: str
) -> None:
    receiver = receive()
    assoc, cx, raw = _storing(receiver.port)
    raw.sendall(_store_command(cx, CT) + p_data_tf(cx, 0x00, b"\x00" * (256 * 1024)))
    # Half a data set is on its way to the spool: wait until its part is there, then end the association.
    _until("no part in the spool", lambda: any(p.suffix == TEMPORARY_SUFFIX for p in _spool(core).iterdir()))
    if end == "abort":
        assoc.abort()  # A-ABORT
    else:
        raw.shutdown(socket.SHUT_RDWR)  # the connection drops
    _until("the part was not removed", lambda: not list(_spool(core).iterdir()))
    assert _inputs(core.journal) == []
    assoc.abort()
    assert _store(receiver.port, CT) == [SUCCESS]


def test_a_store_that_runs_out_of_room_as_it_arrives_is_answered_out_of_resources_and_kept_nowhere(
    core: ScoringCore, receive: Receive
) -> None:
    receiver = receive()
    assoc, cx, raw = _storing(receiver.port)
    quarter = b"\x00" * (256 * 1024)
    with _reactor_paused(assoc):  # the C-STORE-RSP is this test's to read, not the association's own loop's
        raw.sendall(_store_command(cx, CT) + p_data_tf(cx, 0x00, quarter))
        _until("no part in the spool", lambda: any(p.suffix == TEMPORARY_SUFFIX for p in _spool(core).iterdir()))
        core.faults.report(OSError(errno.ENOSPC, "No space left on device"))  # as a failed write elsewhere says it
        raw.sendall(p_data_tf(cx, 0x00, quarter) + p_data_tf(cx, 0x02, quarter))  # the rest, to the last fragment
        _, answer = assoc.dimse.get_msg(block=True)  # the C-STORE-RSP
    assert answer is not None and int(getattr(answer, "Status", -1)) == OUT_OF_RESOURCES
    assert list(_spool(core).iterdir()) == [] and _inputs(core.journal) == []
    assoc.release()


@contextlib.contextmanager
def _reactor_paused(assoc: Association) -> Iterator[None]:
    """As pynetdicom's own release does: its reactor would take a message nobody it knows waits for as a request
    ("Received unexpected C-STORE service message") and drop it."""
    assoc._reactor_checkpoint.clear()
    _until("the reactor did not pause", lambda: assoc._is_paused)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def test_a_receiver_on_the_network_without_tls_says_so_at_start(
    receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        receive(host="0.0.0.0")
    assert any("listening on 0.0.0.0 without TLS" in line for line in _receiver_lines(caplog))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        receive()
    assert not [line for line in _receiver_lines(caplog) if "without TLS" in line]  # on loopback


# --- failures: answered with a status, nothing half-kept ------------------------------------------------


def test_a_full_disk_fault_answers_out_of_resources_stores_nothing_and_logs_once(
    core: ScoringCore, receive: Receive, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receive()
    core.faults.report(OSError(errno.ENOSPC, "No space left on device"))  # as a failed write reports it
    assert core.faults.holds(STORAGE)
    with caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"):
        assert _store(receiver.port, CT, MR, CT) == [OUT_OF_RESOURCES] * 3
    refused = [r for r in caplog.records if "out of resources" in r.getMessage()]
    assert len(refused) == 1, "a burst refused for want of space is one log line, not one per instance"
    assert _inputs(core.journal) == [] and list(_spool(core).iterdir()) == []


def test_below_the_free_space_mark_stores_are_refused_and_health_says_why(core: ScoringCore, receive: Receive) -> None:
    spool = _spool(core)
    spool.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(spool)
    mark = st.f_bavail * st.f_frsize // (1024 * 1024) + 1024  # a GB more than is free
    faults = Faults([spool], mark)  # the daemon's faults watch the data folder the spool is in
    receiver = receive(faults=faults, min_free_mb=mark)
    assert _store(receiver.port, CT) == [OUT_OF_RESOURCES]
    assert faults.holds(STORAGE) and not faults.accepting() and faults.problems()
    assert _inputs(core.journal) == [] and list(spool.iterdir()) == []


def test_a_failed_spool_write_answers_out_of_resources_and_journals_nothing(
    core: ScoringCore, receive: Receive
) -> None:
    receiver = receive()
    spool = _spool(core)
    spool.rmdir()
    spool.write_bytes(b"")  # the spool folder is now a file: every write in it fails (ENOTDIR)
    try:
        assert _store(receiver.port, CT) == [OUT_OF_RESOURCES]
    finally:
        spool.unlink()
        spool.mkdir()
    assert _inputs(core.journal) == []
    assert receiver.alive() and _store(receiver.port, CT) == [SUCCESS]  # and it serves on


def test_a_failed_journal_write_answers_out_of_resources_and_removes_the_spooled_copy(
    core: ScoringCore, receive: Receive, tmp_path: Path
) -> None:
    broken = Journal(tmp_path / "closed" / "journal.sqlite3")
    broken.close()  # every registration now fails
    intake = Intake(broken, core.stages, core.config.watch, on_duplicate=core.metrics.duplicates.inc)
    receiver = receive(intake=intake)
    assert _store(receiver.port, CT) == [OUT_OF_RESOURCES]
    assert list(_spool(core).iterdir()) == []


def test_start_refuses_a_busy_port_and_unreadable_tls_files_and_stop_closes_the_port(
    core: ScoringCore, receive: Receive, tmp_path: Path
) -> None:
    running = receive()
    busy = DicomConfig(enabled=True, port=running.port, allowed=[DicomCaller(ae_title=SCANNER)])
    with pytest.raises(ConfigError, match="cannot listen"):
        DicomReceiver(busy, core.intake, _spool(core), core.faults, 0).start()
    missing = DicomConfig(
        enabled=True,
        port=0,
        allowed=[DicomCaller(ae_title=SCANNER)],
        tls_cert=tmp_path / "none.crt",
        tls_key=tmp_path / "none.key",
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls"):
        DicomReceiver(missing, core.intake, _spool(core), core.faults, 0).start()
    port = running.port
    running.stop()
    assert not running.alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5).close()


def test_stop_ends_open_associations_and_acknowledges_nothing_more(core: ScoringCore, receive: Receive) -> None:
    receiver = receive()
    assoc = _associate(receiver.port, (CT,))
    assert assoc.is_established
    receiver.stop()
    try:
        answered = "Status" in assoc.send_c_store(CT)
    except RuntimeError:  # the abort reached the SCU first: "Association not established"
        answered = False
    assert not answered and _inputs(core.journal) == []
    assoc.abort()


# --- DICOM TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    make_server(out, ["localhost"], [HOST])
    make_terminal(out, "ct01")
    return out


def _tls_client(certs: Path, *, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs / "ca.crt")
    if with_certificate:
        folder = certs / "terminals" / "ct01"
        context.load_cert_chain(folder / "ct01.crt", folder / "ct01.key")
    return context


def test_tls_takes_a_scanner_with_a_certificate_and_refuses_plain_and_anonymous_ones(
    core: ScoringCore, receive: Receive, certs: Path
) -> None:
    receiver = receive(tls_cert=certs / "server.crt", tls_key=certs / "server.key", tls_client_ca=certs / "ca.crt")
    # A peer that connects and never shakes hands holds up no one (the handshake is off the accept loop).
    with socket.create_connection((HOST, receiver.port), timeout=5):
        assert _store(receiver.port, CT, tls=_tls_client(certs)) == [SUCCESS]
    [row] = _inputs(core.journal)
    assert results_of(core.journal, row.id)[0].outcome is Outcome.SCORED
    assert not _associate(receiver.port).is_established  # plain TCP
    assert not _associate(receiver.port, tls=_tls_client(certs, with_certificate=False)).is_established
    assert len(_inputs(core.journal)) == 1


def test_a_tls_handshake_not_whole_by_the_request_deadline_is_closed(
    core: ScoringCore, receive: Receive, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # timeout_s (20) is for what follows trust; before it, the handshake has request_timeout_s.
    receiver = receive(tls_cert=certs / "server.crt", tls_key=certs / "server.key", request_timeout_s=0.5)
    with (
        caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"),
        socket.create_connection((HOST, receiver.port), timeout=10) as sock,
    ):
        sock.sendall(b"\x16\x03\x01")  # the start of a TLS record (a ClientHello), then nothing
        assert _read_to_end(sock) == b""
    # ssl closes the socket as the handshake fails, before the front counts the refusal: wait for the count.
    _until("the refusal was not counted", lambda: _refusals(core, "tls") == 1.0)
    assert _receiver_lines(caplog) == [
        "DICOM connection refused (tls) from 127.0.0.1: no TLS session (no TLS handshake within "
        "dicom.request_timeout_s)"
    ]


def test_a_tls_session_that_then_sends_nothing_is_closed_at_the_request_deadline(
    core: ScoringCore, receive: Receive, certs: Path
) -> None:
    """The slowloris over TLS: a completed handshake earns no more time to send the association request."""
    receiver = receive(
        tls_cert=certs / "server.crt",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.crt",
        request_timeout_s=0.5,
    )
    with socket.create_connection((HOST, receiver.port), timeout=10) as raw:
        with _tls_client(certs).wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"\x01\x00")  # a scanner's certificate, then half a header, then nothing
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert sock.recv(1) == b""
        assert _store(receiver.port, CT, tls=_tls_client(certs)) == [SUCCESS]
    assert _refusals(core, "request_timeout") == 1.0


def test_under_tls_a_pending_connection_evicted_mid_handshake_is_closed_at_once(
    core: ScoringCore, receive: Receive, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ssl's wrap_socket detaches the plain socket before its handshake: an eviction that shut that one
    reached nothing, and the evicted connection held its place until request_timeout_s."""
    receiver = receive(
        tls_cert=certs / "server.crt",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.crt",
        max_pending=1,
        request_timeout_s=60,
    )
    with (
        caplog.at_level(logging.WARNING, logger="appliance.intake.dicom_receiver"),
        socket.create_connection((HOST, receiver.port), timeout=10) as stalled,
    ):
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing: its handshake waits
        # A scanner from another host, the one more pending connection: the stalled one is closed for it.
        assert _store(receiver.port, CT, tls=_tls_client(certs), source="127.0.0.2") == [SUCCESS]
        # Not a timing: 20 s only tells the eviction from the request deadline (60 s), which also closes it.
        stalled.settimeout(20)
        try:
            assert stalled.recv(4096) == b""
        except ConnectionResetError:
            pass  # a reset is a close too
        except TimeoutError:
            pytest.fail("the evicted connection was left open until its deadline")
    assert _refusals(core, "pending_full") == 1.0
    assert _receiver_lines(caplog) == [
        "DICOM connection refused (pending_full) from 127.0.0.1: the oldest of dicom.max_pending = 1 "
        "connections still without an association request, closed for a newer one"
    ]
    [row] = _inputs(core.journal)
    assert row.source == "dicom"


# --- DCMTK as the scanner -------------------------------------------------------------------------------


@needs("storescu", "echoscu")
def test_dcmtk_echoscu_and_storescu_are_served_and_a_stranger_is_refused(core: ScoringCore, receive: Receive) -> None:
    port = receive().port
    echo = echoscu(HOST, port, SCANNER, APPLIANCE)
    assert echo.returncode == 0, echo.stderr
    for _ in range(2):  # the same instance twice: scored once
        sent = storescu([CT], HOST, port, SCANNER, APPLIANCE)
        assert sent.returncode == 0, sent.stderr
    jpeg = storescu([JPEG], HOST, port, SCANNER, APPLIANCE)  # proposed and sent as JPEG Baseline
    assert jpeg.returncode == 0, jpeg.stderr
    ct, ct_again, baseline = _inputs(core.journal)
    assert ct_again.duplicate_of == ct.id and baseline.duplicate_of is None
    assert results_of(core.journal, ct.id)[0].outcome is Outcome.SCORED
    assert results_of(core.journal, baseline.id)[0].input.file_name == f"{_sop_uid(JPEG)}.dcm"
    stranger = echoscu(HOST, port, "STRANGER", APPLIANCE)
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    _spool_empties(core)


@needs("storescu")
def test_dcmtk_storescu_over_tls_with_its_certificate(core: ScoringCore, receive: Receive, certs: Path) -> None:
    receiver = receive(tls_cert=certs / "server.crt", tls_key=certs / "server.key", tls_client_ca=certs / "ca.crt")
    folder = certs / "terminals" / "ct01"
    tls = ["+tls", str(folder / "ct01.key"), str(folder / "ct01.crt"), "+cf", str(certs / "ca.crt")]
    sent = storescu([CT], HOST, receiver.port, SCANNER, APPLIANCE, extra_args=tls)
    assert sent.returncode == 0, sent.stderr
    assert storescu([CT], HOST, receiver.port, SCANNER, APPLIANCE).returncode != 0  # plain TCP
    [row] = _inputs(core.journal)
    assert row.source == "dicom"


def test_an_instance_that_is_not_scored_is_set_aside_with_its_reason_not_deleted(
    core: ScoringCore, receive: Receive
) -> None:
    """The scanner was answered before scoring and will not send it again: a rejected instance is kept."""
    receiver = receive()
    report = Path(get_testdata_file("test-SR.dcm"))  # no pixel data: rejected
    assert _store(receiver.port, report) == [SUCCESS]
    [row] = _inputs(core.journal)
    [result] = results_of(core.journal, row.id)
    assert result.rejection is not None and result.rejection.code == "no_pixel_data"
    _spool_empties(core)  # moved aside after the commit
    rejected = core.config.watch.rejected_dir
    kept = [p for p in rejected.iterdir() if not p.name.endswith(".reason.txt")]
    assert [p.read_bytes() for p in kept] == [_as_received(report)]
    reason = next(rejected.glob("*.reason.txt")).read_text()
    assert f"input_id: {row.id}" in reason and "code: no_pixel_data" in reason
