"""The outbox against a real DICOM peer: a pynetdicom Storage SCP on a free localhost port that stores what it
receives, answers the statuses a test asks for, and is stopped and started again as a PACS going down and up.
The journal is a real SQLite file; nothing of the appliance is replaced."""

from __future__ import annotations

import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.status import code_to_category
from pynetdicom.transport import ThreadedAssociationServer

from appliance.api.certs import make_server, make_terminal
from appliance.config import PacsConfig
from appliance.delivery.outbox import Outbox, Verdict, backoff_s, verdict
from appliance.domain.delivery import DeliveryState
from appliance.journal.journal import Journal, NewDelivery, NewResult
from appliance.privacy import hashed

WAIT_S = 30.0  # a ceiling for waits on events, never a pause
LOGGER = "appliance.delivery.outbox"


# --- the PACS ---------------------------------------------------------------------------------------------


class Pacs:
    """A Storage SCP. ``answers[uid]`` lists the statuses to answer that instance in turn (success after them);
    ``hold``, when set, keeps each C-STORE waiting until it is set."""

    def __init__(
        self, sop_classes: tuple[str, ...] = (EnhancedSRStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
    ) -> None:
        self.sop_classes = sop_classes
        self.port = 0
        self.stored: Counter[str] = Counter()  # SOP Instance UID -> times stored
        self.datasets: dict[str, bytes] = {}
        self.associations = 0
        self.answers: dict[str, list[int | Dataset]] = {}
        self.hold: threading.Event | None = None
        self.abort_once: set[str] = set()  # instances whose first C-STORE aborts the association
        self.storing = threading.Event()  # a C-STORE has reached the handler
        self._cond = threading.Condition()
        self._server: ThreadedAssociationServer | None = None

    def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        ae = AE(ae_title="PACS")
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_association)],
        )
        assert server is not None
        self._server = server
        self.port = server.server_address[1]

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server = None

    def _on_association(self, event: Event) -> None:
        with self._cond:
            self.associations += 1

    def _on_store(self, event: Event) -> int | Dataset:
        request = event.request
        assert isinstance(request, C_STORE)
        uid = str(request.AffectedSOPInstanceUID)
        self.storing.set()
        with self._cond:
            if uid in self.abort_once:
                self.abort_once.discard(uid)
                event.assoc.abort()
                return 0xA700  # never reaches the appliance: the association is gone
        if self.hold is not None:
            self.hold.wait(WAIT_S)
        with self._cond:
            queue = self.answers.get(uid)
            answer = queue.pop(0) if queue else 0x0000
            status = answer if isinstance(answer, int) else int(answer.Status)
            if code_to_category(status) in ("Success", "Warning"):
                self.stored[uid] += 1
                self.datasets[uid] = event.encoded_dataset()
            self._cond.notify_all()
        return answer

    def wait(self, predicate: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, WAIT_S)


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    peer = Pacs()
    peer.start()
    yield peer
    if peer._server is not None:
        peer.stop()


class Recorder:
    """The observer (the metrics' side), with a condition to wait on."""

    def __init__(self) -> None:
        self.delivered = 0
        self.refused: list[int] = []
        self.depths: list[tuple[int, float]] = []
        self._cond = threading.Condition()

    def on_delivered(self, count: int) -> None:
        with self._cond:
            self.delivered += count
            self._cond.notify_all()

    def on_refused(self, status: int) -> None:
        with self._cond:
            self.refused.append(status)
            self._cond.notify_all()

    def on_depth(self, pending: int, oldest_age_s: float) -> None:
        with self._cond:
            self.depths.append((pending, oldest_age_s))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, WAIT_S)

    def drained(self) -> bool:
        """The last depth reported: nothing waits."""
        return bool(self.depths) and self.depths[-1] == (0, 0.0)


# --- reports ----------------------------------------------------------------------------------------------


@contextmanager
def _running(outbox: Outbox) -> Iterator[Outbox]:
    """The outbox sending in its thread for the block, stopped after it whatever happens."""
    outbox.start()
    try:
        yield outbox
    finally:
        outbox.stop()


def _sr(sop_class: str = EnhancedSRStorage) -> NewDelivery:
    """A small structured report (the outbox does not care what it sends, only that it is DICOM)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return NewDelivery(sop_class, ds.SOPInstanceUID, out.getvalue())


def _jpeg_image() -> NewDelivery:
    """A JPEG-compressed secondary capture, as a heatmap overlay may be: sent as encoded, never decoded."""
    ds = dcmread(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    ds.SOPInstanceUID = generate_uid()
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return NewDelivery(SecondaryCaptureImageStorage, ds.SOPInstanceUID, out.getvalue())


def _store(j: Journal, *deliveries: NewDelivery) -> list[int]:
    """One scored input per report; returns their results' sequence numbers."""
    seqs: list[int] = []
    for d in deliveries:
        uid = d.sop_instance_uid
        reg = j.register(source="dicom", path=None, file_name="x.dcm", size=1, mtime_ns=1, content_hash=uid)
        result = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.3", payload=b"p", deliveries=(d,))
        seqs += j.complete(reg.input.id, [result])
    return seqs


def _config(pacs: Pacs, **changes: object) -> PacsConfig:
    fields: dict[str, object] = {"enabled": True, "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    fields |= {"calling_ae_title": "APPLIANCE", "retry_s": 0.05, "retry_max_s": 0.2, "timeout_s": 5.0}
    return PacsConfig(**(fields | changes))


def _state(j: Journal, seq: int) -> DeliveryState:
    delivery = j.delivery_of(seq)
    assert delivery is not None
    return delivery.state


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite3")
    yield j
    j.close()


def _outbox_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- tests ------------------------------------------------------------------------------------------------


def test_reports_go_to_the_pacs_several_on_one_association(journal: Journal, pacs: Pacs) -> None:
    reports = [_sr(), _sr(Comprehensive3DSRStorage), _jpeg_image(), _sr(), _sr()]
    seqs = _store(journal, *reports)
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs), seen)) as outbox:
        pacs.wait(lambda: len(pacs.stored) == len(reports))
        seen.wait(lambda: seen.delivered == len(reports) and seen.drained())
    assert not outbox.alive()
    assert pacs.stored == Counter({r.sop_instance_uid: 1 for r in reports})
    assert pacs.associations == 1  # three SOP classes, two transfer syntaxes, one association
    assert [_state(journal, s) for s in seqs] == [DeliveryState.DELIVERED] * len(reports)
    jpeg = dcmread(BytesIO(reports[2].payload))
    assert dcmread(BytesIO(pacs.datasets[jpeg.SOPInstanceUID])).PixelData == jpeg.PixelData  # as encoded


def test_a_pacs_down_for_a_while_loses_nothing_and_the_outbox_drains_when_it_returns(
    journal: Journal, pacs: Pacs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pacs.stop()
    seqs = _store(journal, *(_sr() for _ in range(6)))
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs, per_association=4), seen)) as outbox:
        # Down: every report is tried again and again, with back-off, and stays pending.
        seen.wait(lambda: all(journal.delivery_of(s).attempts >= 3 for s in seqs))  # type: ignore[union-attr]
        assert [_state(journal, s) for s in seqs] == [DeliveryState.PENDING] * 6
        reason = journal.delivery_of(seqs[0]).reason  # type: ignore[union-attr]
        assert reason.startswith("no connection to the PACS")
        assert seen.depths and all(pending == 6 for pending, _ in seen.depths)
        assert seen.depths[-1][1] > 0  # the oldest report's age, growing
        more = _store(journal, _sr())  # results keep coming while it is down
        outbox.wake()

        pacs.start()  # back, on the same port
        pacs.wait(lambda: len(pacs.stored) == 7)
        seen.wait(seen.drained)
    assert set(pacs.stored.values()) == {1}  # each delivered exactly once
    assert [_state(journal, s) for s in seqs + more] == [DeliveryState.DELIVERED] * 7
    assert seen.delivered == 7 and seen.refused == []
    warnings = _outbox_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and "no connection to the PACS" in warnings[0], warnings  # one per outage
    assert len([m for m in _outbox_lines(caplog, logging.INFO) if "answers again" in m]) == 1


def test_a_refusal_is_set_aside_and_does_not_block_the_rest(
    journal: Journal, pacs: Pacs, caplog: pytest.LogCaptureFixture
) -> None:
    ok, cannot, mismatch, coerced, busy, last = reports = [_sr() for _ in range(6)]
    refusal = Dataset()
    refusal.Status = 0xC000
    refusal.ErrorComment = "Patient DOE^JANE unknown"  # the PACS's free text: journal only, never the log
    pacs.answers = {
        cannot.sop_instance_uid: [refusal],
        mismatch.sop_instance_uid: [0xA900],
        coerced.sop_instance_uid: [0xB000],  # a warning is delivered
        busy.sop_instance_uid: [0xA700, 0xA702],  # out of resources, twice: tried again
    }
    seqs = dict(zip((r.sop_instance_uid for r in reports), _store(journal, *reports), strict=True))
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs), seen)):
        pacs.wait(lambda: len(pacs.stored) == 4)
        seen.wait(seen.drained)

    def delivery(r: NewDelivery) -> tuple[DeliveryState, int, int | None]:
        d = journal.delivery_of(seqs[r.sop_instance_uid])
        assert d is not None
        return d.state, d.attempts, d.status

    assert delivery(ok) == delivery(last) == (DeliveryState.DELIVERED, 0, 0x0000)
    assert delivery(coerced) == (DeliveryState.DELIVERED, 0, 0xB000)
    assert delivery(busy) == (DeliveryState.DELIVERED, 2, 0x0000)
    assert delivery(cannot) == (DeliveryState.REFUSED, 1, 0xC000)
    assert delivery(mismatch) == (DeliveryState.REFUSED, 1, 0xA900)
    assert journal.delivery_of(seqs[cannot.sop_instance_uid]).reason == (  # type: ignore[union-attr]
        "0xC000 Failure: Cannot Understand; the PACS said: Patient DOE^JANE unknown"
    )
    assert sorted(seen.refused) == [0xA900, 0xC000]
    assert pacs.stored == Counter({r.sop_instance_uid: 1 for r in (ok, coerced, busy, last)})
    errors = _outbox_lines(caplog, logging.ERROR)
    assert len(errors) == 2
    assert any(hashed(cannot.sop_instance_uid) in m and "0xC000 (Failure: Cannot Understand)" in m for m in errors)
    logged = caplog.text
    assert "DOE" not in logged and all(r.sop_instance_uid not in logged for r in reports)


def test_an_association_lost_mid_batch_keeps_what_was_acknowledged_and_retries_the_rest(
    journal: Journal, pacs: Pacs
) -> None:
    reports = [_sr() for _ in range(5)]
    pacs.abort_once = {reports[2].sop_instance_uid}
    seqs = _store(journal, *reports)
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs), seen)):
        pacs.wait(lambda: len(pacs.stored) == 5)
        seen.wait(seen.drained)
    assert set(pacs.stored.values()) == {1}
    attempts = [journal.delivery_of(s).attempts for s in seqs]  # type: ignore[union-attr]
    assert attempts == [0, 0, 1, 1, 1]  # the first two were acknowledged before the abort
    assert pacs.associations == 2


def test_a_kind_the_pacs_does_not_take_is_refused_and_the_others_are_sent(journal: Journal) -> None:
    pacs = Pacs(sop_classes=(EnhancedSRStorage,))
    pacs.start()
    try:
        enhanced, comprehensive = _sr(), _sr(Comprehensive3DSRStorage)
        seqs = _store(journal, enhanced, comprehensive)
        seen = Recorder()
        with _running(Outbox(journal, _config(pacs), seen)):
            seen.wait(seen.drained)
        assert pacs.stored == Counter({enhanced.sop_instance_uid: 1})
        refused = journal.delivery_of(seqs[1])
        assert refused is not None and (refused.state, refused.status) == (DeliveryState.REFUSED, 0x0122)
        assert "accepted no presentation context" in refused.reason
        assert seen.refused == [0x0122]

        # A PACS that takes none of the kinds offered refuses at association: that is no outage.
        only = _store(journal, _sr(Comprehensive3DSRStorage))
        with _running(Outbox(journal, _config(pacs), seen)):
            seen.wait(lambda: seen.refused == [0x0122, 0x0122])
        assert _state(journal, only[0]) is DeliveryState.REFUSED
    finally:
        pacs.stop()


def test_a_new_outbox_on_the_same_journal_sends_what_was_pending(tmp_path: Path, pacs: Pacs) -> None:
    path = tmp_path / "journal.sqlite3"
    pacs.stop()
    journal = Journal(path)
    seqs = _store(journal, *(_sr() for _ in range(3)))
    patient = _config(pacs, retry_s=600.0, retry_max_s=600.0)
    seen = Recorder()
    outbox = Outbox(journal, patient, seen)
    outbox.start()
    seen.wait(lambda: all(journal.delivery_of(s).attempts >= 1 for s in seqs))  # type: ignore[union-attr]
    outbox.stop()  # promptly, though it was waiting out a back-off of ten minutes
    journal.close()

    pacs.start()
    journal = Journal(path)  # as after a restart of the daemon
    seen = Recorder()
    outbox = Outbox(journal, patient, seen)  # sends at once, not after the back-off the old one set
    outbox.start()
    try:
        pacs.wait(lambda: len(pacs.stored) == 3)
        seen.wait(seen.drained)
    finally:
        outbox.stop()
        journal.close()
    assert set(pacs.stored.values()) == {1}


def test_stop_finishes_the_send_in_flight_and_leaves_the_rest_pending(journal: Journal, pacs: Pacs) -> None:
    reports = [_sr() for _ in range(4)]
    seqs = _store(journal, *reports)
    pacs.hold = threading.Event()
    outbox = Outbox(journal, _config(pacs))
    outbox.start()
    assert pacs.storing.wait(WAIT_S)  # the first report is at the PACS, its answer held back
    stopper = threading.Thread(target=outbox.stop)
    with journal.changed:  # stop() says so on this condition, once it has asked the sender to stop
        stopper.start()
        assert journal.changed.wait(WAIT_S)
    pacs.hold.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive() and not outbox.alive()
    assert pacs.stored == Counter({reports[0].sop_instance_uid: 1})
    assert _state(journal, seqs[0]) is DeliveryState.DELIVERED  # the send in flight was finished and recorded
    rest = [journal.delivery_of(s) for s in seqs[1:]]
    assert [(d.state, d.attempts) for d in rest if d] == [(DeliveryState.PENDING, 0)] * 3  # untouched

    pacs.hold = None
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs), seen)) as outbox:
        pacs.wait(lambda: len(pacs.stored) == 4)
        seen.wait(seen.drained)
    assert set(pacs.stored.values()) == {1}


def test_dicom_tls_with_a_client_certificate(journal: Journal, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_server(certs, ["localhost"], ["127.0.0.1"])
    client = make_terminal(certs, "appliance")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    server_tls.load_cert_chain(certs / "server.crt", certs / "server.key")
    pacs = Pacs()
    pacs.start(ssl_context=server_tls)
    try:
        seqs = _store(journal, _sr(), _sr())
        # Without its certificate the appliance is turned away at the handshake: retried, nothing lost.
        seen = Recorder()
        with _running(Outbox(journal, _config(pacs, tls_ca=certs / "ca.crt"), seen)):
            seen.wait(lambda: all(journal.delivery_of(s).attempts >= 1 for s in seqs))  # type: ignore[union-attr]
        assert not pacs.stored

        config = _config(
            pacs,
            tls_ca=certs / "ca.crt",
            tls_cert=client / "appliance.crt",
            tls_key=client / "appliance.key",
        )
        with _running(Outbox(journal, config, seen)):
            pacs.wait(lambda: len(pacs.stored) == 2)
            seen.wait(seen.drained)
        assert [_state(journal, s) for s in seqs] == [DeliveryState.DELIVERED] * 2
    finally:
        pacs.stop()


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, Verdict.DELIVERED),
        *((w, Verdict.DELIVERED) for w in (0xB000, 0xB006, 0xB007, 0x0107, 0x0116, 0x0111)),
        *((f, Verdict.RETRY) for f in (0xA700, 0xA7FF, 0x0213)),
        *((f, Verdict.REFUSED) for f in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0117, 0x0122, 0x0124, 0x0211)),
    ],
)
def test_what_each_status_means(status: int, expected: Verdict) -> None:
    assert verdict(status) is expected


def test_back_off_doubles_up_to_its_ceiling() -> None:
    config = PacsConfig(retry_s=5.0, retry_max_s=300.0)
    assert [backoff_s(n, config) for n in (1, 2, 3, 4, 7, 8, 10_000)] == [5.0, 10.0, 20.0, 40.0, 300.0, 300.0, 300.0]
