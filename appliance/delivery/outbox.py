"""The outbox's sender: takes the journal's due DICOM objects to the PACS by C-STORE, several per association,
and records each one's fate (delivered, retried with back-off, or refused and set aside).

Nothing is marked before the PACS answered it, so a stop, a crash or kill -9 leaves every unacknowledged object
pending, sent again later; an object the PACS stored just before a crash may reach it twice, under the same
SOP Instance UID (a PACS keeps one instance per UID).
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from typing import Protocol

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from appliance.config import PacsConfig
from appliance.domain.errors import ApplianceError, ConfigError
from appliance.journal.journal import Journal, OutboxItem
from appliance.privacy import hashed
from appliance.scheduling import lower_this_thread

log = logging.getLogger(__name__)

# A wait never runs longer: the next due time is read again (a clock set back, a wake that was missed).
WAIT_CAP_S = 60.0
# Presentation context ids are odd numbers 1..255 (PS3.8 9.3.2.2): objects past this many kinds wait for the
# next association.
MAX_CONTEXTS = 128
# Failures that say "not now" rather than "never": out of resources (Storage, PS3.4 B.2.3) and the general
# resource limitation (PS3.7 C.5.21).
_OUT_OF_RESOURCES = 0xA700
_RESOURCE_LIMITATION = 0x0213
_DUPLICATE_INSTANCE = 0x0111  # "Duplicate SOP Instance": the PACS has it
# Statuses recorded for what was refused before the PACS was asked (no DIMSE status exists for it); each is the
# standard's status of that meaning, and the reason says it was decided here.
_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported (the PACS accepted no presentation context for it)
_INVALID_INSTANCE = 0x0117  # Invalid SOP instance (the stored bytes cannot be read or encoded)


class OutboxObserver(Protocol):
    """What the sender reports (the metrics implement it)."""

    def on_delivered(self, count: int) -> None: ...

    def on_refused(self, status: int) -> None: ...

    def on_depth(self, pending: int, oldest_age_s: float) -> None: ...


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"


def verdict(status: int) -> Verdict:
    """What a C-STORE status means for the object: success and warnings (0xB000, 0xB006, 0xB007, 0x0107,
    0x0116, ...) are delivered; out of resources (0xA7xx, 0x0213), cancel and pending are tried again; every
    other failure (0xA9xx, 0xCxxx, 0x0122, unknown codes) is a refusal."""
    category = code_to_category(status)
    if category in ("Success", "Warning") or status == _DUPLICATE_INSTANCE:
        return Verdict.DELIVERED  # a duplicate: the PACS holds it already (sent again after a crash)
    if status & 0xFF00 == _OUT_OF_RESOURCES or status == _RESOURCE_LIMITATION or category in ("Cancel", "Pending"):
        return Verdict.RETRY
    return Verdict.REFUSED


def status_meaning(status: int) -> str:
    """pynetdicom's words for a C-STORE status: "Failure: Cannot Understand"."""
    category = code_to_category(status)
    known = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    return f"{category}: {known[1]}" if known and known[1] else category


def backoff_s(attempts: int, config: PacsConfig) -> float:
    """The wait after an object's ``attempts``-th failed try: retry_s, doubled each time, at most retry_max_s."""
    return float(min(config.retry_s * 2.0 ** min(max(attempts - 1, 0), 62), config.retry_max_s))


def tls_context(config: PacsConfig) -> ssl.SSLContext | None:
    """DICOM TLS to the PACS where ``tls_ca`` is set (with this appliance's certificate where one is given)."""
    if config.tls_ca is None:
        if config.tls_cert is not None or config.tls_key is not None:
            raise ConfigError("pacs.tls_cert and pacs.tls_key are used with DICOM TLS only: set pacs.tls_ca too.")
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.tls_ca))
        if config.tls_cert is not None:
            context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"DICOM TLS to the PACS cannot be set up from pacs.tls_ca, tls_cert and tls_key: {e}") from e
    return context


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _syntaxes(transfer_syntax: UID) -> list[str]:
    """Proposed for an object: its own encoding first; an uncompressed one also as the other little-endian
    syntaxes, which pynetdicom converts to (a PACS may accept only Implicit VR)."""
    if transfer_syntax.is_compressed:
        return [transfer_syntax]
    return list(dict.fromkeys([transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def _sendable(accepted: Iterable[PresentationContext], sop_class: UID, transfer_syntax: UID) -> bool:
    """Whether pynetdicom finds an accepted context for the object (its rule: the same syntax, or both
    uncompressed with the same endianness)."""
    for cx in accepted:
        if cx.abstract_syntax != sop_class or not cx.transfer_syntax:
            continue
        agreed = UID(cx.transfer_syntax[0])
        if agreed == transfer_syntax or not (
            agreed.is_compressed
            or transfer_syntax.is_compressed
            or agreed.is_little_endian != transfer_syntax.is_little_endian
        ):
            return True
    return False


@dataclass
class _Heard:
    """What the association request met, for the log line and the stored reason."""

    connected: bool = False
    rejected: str | None = None
    aborted: bool = False

    def on_connect(self, event: Event) -> None:
        self.connected = True

    def on_acse(self, event: Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            self.rejected = f"{primitive.result_str}; {primitive.source_str}; {primitive.reason_str}"
        elif isinstance(primitive, A_ABORT | A_P_ABORT):
            self.aborted = True


@dataclass(frozen=True)
class _Refusal:
    item: OutboxItem
    status: int
    reason: str  # for the journal (and GetResult): it may quote the PACS's free text, so never logged
    here: bool = False  # decided here, before the PACS was asked: the reason holds no PACS text and is logged


@dataclass
class _Ready:
    item: OutboxItem
    dataset: Dataset
    sop_class: UID
    transfer_syntax: UID


class Outbox:
    """One thread sends what the journal's outbox holds, an association at a time.

    It takes the due objects (at most ``per_association``), opens one association, sends each and records the
    answers. When no association can be made, the objects tried wait out their back-off and so does the
    sender (one try per back-off, not one per batch); when the PACS answers again, and at start, every object
    still waiting out a back-off is sent at once. Between rounds it waits on ``journal.changed`` (new results),
    ``wake()``, or the next due time.
    """

    def __init__(self, journal: Journal, config: PacsConfig, observer: OutboxObserver | None = None) -> None:
        self._journal = journal
        self._config = config
        self._observer = observer
        self._tls = tls_context(config)
        self._ae = AE(ae_title=config.calling_ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self._ae, timeout, config.timeout_s)
        self._stopping = threading.Event()
        self._poked = False  # under journal.changed: a wake() since the last wait
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._assoc: Association | None = None  # the one open now, for stop()
        self._trouble: str | None = None  # why the PACS takes nothing now: logged once, when it starts
        self._answered = False  # the PACS delivered something since start
        self._fresh = True  # no round yet since start
        self._gate_ms = 0  # no association before this (set after one failed)
        self._journal_failing = False
        self._peer = f"{config.ae_title}@{config.host}:{config.port}"

    # --- life ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the object being sent, record the answers, and return (within about ``timeout``, by default
        the PACS's timeout): what was not sent stays pending, as it was."""
        self._stopping.set()
        self.wake()
        if not self._thread.is_alive():
            return
        wait = self._config.timeout_s + 1.0 if timeout is None else timeout
        self._thread.join(wait)
        assoc = self._assoc
        if self._thread.is_alive() and assoc is not None:
            # The PACS does not answer within the timeout: give up the association; the object in flight stays
            # pending and is sent again after the next start.
            log.warning(
                "outbox: the PACS %s did not answer in %g s; stopping without it", self._peer, self._config.timeout_s
            )
            assoc.abort()
            self._thread.join(min(5.0, wait))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """New objects were stored, or the daemon wants a look now."""
        with self._journal.changed:
            self._poked = True
            self._journal.changed.notify_all()

    def _run(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while not self._stopping.is_set():
            try:
                if not self._round():
                    self._wait()
                self._journal_failing = False
            except (ApplianceError, sqlite3.Error) as e:  # the journal's problem: health and the log say it too
                if not self._journal_failing:
                    log.warning(
                        "outbox: the journal cannot be read or written (%s); nothing is sent until it can",
                        type(e).__name__,
                    )
                self._journal_failing = True
                self._stopping.wait(self._config.retry_s)
            except Exception as e:  # a bug must not end the sending for good: said, and tried again later
                log.error("outbox: a round failed: %s; tried again in %.0f s", type(e).__name__, self._config.retry_s)
                self._stopping.wait(self._config.retry_s)

    def _wait(self) -> None:
        with self._journal.changed:
            if not self._poked and not self._stopping.is_set():
                wake = self._journal.next_outbox_wake_ms()
                if wake is None:
                    timeout = WAIT_CAP_S
                else:
                    timeout = min(max(max(wake, self._gate_ms) - _now_ms(), 0) / 1000, WAIT_CAP_S)
                if timeout > 0:
                    self._journal.changed.wait(timeout)
            self._poked = False

    # --- a round: one association -------------------------------------------------------------------

    def _round(self) -> bool:
        """Send what is due on one association; False when nothing is due (or after a failed association,
        before the sender's back-off has passed)."""
        now = _now_ms()
        if self._fresh:
            # A start (often after the PACS or its address was mended) tries at once what sat out a back-off.
            self._journal.outbox_hasten(now)
            self._fresh = False
        items = [] if now < self._gate_ms else self._journal.outbox_due(now, self._config.per_association)
        if items:
            self._send(items)
        self._report_depth()
        return bool(items)

    def _send(self, items: list[OutboxItem]) -> None:
        ready: list[_Ready] = []
        contexts: dict[tuple[UID, UID], PresentationContext] = {}
        refused: list[_Refusal] = []
        for item in items:
            try:
                # Pixel data stays as stored bytes: nothing here decodes it.
                dataset = dcmread(BytesIO(item.payload))
                sop_class, transfer_syntax = UID(dataset.SOPClassUID), UID(dataset.file_meta.TransferSyntaxUID)
            except Exception as e:
                why = f"the stored object cannot be read ({type(e).__name__}); it was not sent"
                refused.append(_Refusal(item, _INVALID_INSTANCE, why, here=True))
                continue
            key = (sop_class, transfer_syntax)
            if key not in contexts:
                if len(contexts) == MAX_CONTEXTS:
                    continue  # the next association takes it
                contexts[key] = build_context(sop_class, _syntaxes(transfer_syntax))
            ready.append(_Ready(item, dataset, sop_class, transfer_syntax))
        try:
            if ready:
                self._associate_and_send(ready, list(contexts.values()), refused)
        finally:
            for refusal in refused:
                self._refuse(refusal)

    def _associate_and_send(
        self, ready: list[_Ready], contexts: list[PresentationContext], refused: list[_Refusal]
    ) -> None:
        heard = _Heard()
        assoc = self._ae.associate(
            self._config.host,
            self._config.port,
            contexts=contexts,
            ae_title=self._config.ae_title,
            tls_args=(self._tls, self._config.host) if self._tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, heard.on_connect), (evt.EVT_ACSE_RECV, heard.on_acse)],
        )
        if not assoc.is_established:
            if heard.connected and heard.rejected is None and not assoc.accepted_contexts and assoc.rejected_contexts:
                # It answered, and accepted none of the kinds proposed: asking again would not change that.
                refused += [_Refusal(r.item, _NOT_SUPPORTED, _no_context(r), here=True) for r in ready]
                return
            self._not_sent([r.item for r in ready], self._association_failure(heard))
            return
        self._assoc = assoc
        delivered: dict[int, list[int]] = defaultdict(list)  # status -> ids
        busy: list[tuple[OutboxItem, int]] = []
        lost: list[OutboxItem] = []
        try:
            for n, r in enumerate(ready):
                if self._stopping.is_set():
                    break  # the rest stay pending, untouched
                if not _sendable(assoc.accepted_contexts, r.sop_class, r.transfer_syntax):
                    refused.append(_Refusal(r.item, _NOT_SUPPORTED, _no_context(r), here=True))
                    continue
                try:
                    answer = assoc.send_c_store(r.dataset, msg_id=n % 65535 + 1)
                except (ValueError, AttributeError) as e:
                    why = f"the stored object cannot be encoded for the PACS ({type(e).__name__}); it was not sent"
                    refused.append(_Refusal(r.item, _INVALID_INSTANCE, why, here=True))
                    continue
                except RuntimeError:  # the association ended under it
                    lost = [x.item for x in ready[n:] if not self._is_refused(x.item, refused)]
                    break
                if "Status" not in answer:  # no answer in time, or the association was aborted
                    lost = [x.item for x in ready[n:] if not self._is_refused(x.item, refused)]
                    break
                status = int(answer.Status)
                match verdict(status):
                    case Verdict.DELIVERED:
                        delivered[status].append(r.item.id)
                        if status:
                            log.info(
                                "outbox: the PACS stored report %s with a warning (0x%04X %s)",
                                hashed(r.item.sop_instance_uid),
                                status,
                                status_meaning(status),
                            )
                    case Verdict.RETRY:
                        busy.append((r.item, status))
                    case Verdict.REFUSED:
                        refused.append(_Refusal(r.item, status, self._refusal_reason(status, answer)))
        finally:
            if assoc.is_established:
                if self._stopping.is_set():
                    assoc.abort()  # what was answered is recorded below; a release could wait a timeout more
                else:
                    assoc.release()
            self._assoc = None
        self._record(delivered, busy)
        if lost:
            self._not_sent(lost, "the association was lost while sending (no answer in time, or aborted)")

    @staticmethod
    def _is_refused(item: OutboxItem, refused: list[_Refusal]) -> bool:
        return any(x.item.id == item.id for x in refused)

    @staticmethod
    def _refusal_reason(status: int, answer: Dataset) -> str:
        reason = f"0x{status:04X} {status_meaning(status)}"
        comment = answer.get("ErrorComment")
        # Into the journal (and GetResult) only, never the log: the PACS's free text may name a patient.
        return f"{reason}; the PACS said: {str(comment).strip()}" if comment else reason

    # --- recording ----------------------------------------------------------------------------------

    def _record(self, delivered: dict[int, list[int]], busy: list[tuple[OutboxItem, int]]) -> None:
        count = sum(len(ids) for ids in delivered.values())
        for status, ids in delivered.items():
            self._journal.outbox_delivered(ids, status)
        if count:
            if self._observer is not None:
                self._observer.on_delivered(count)
            self._answers_again()
        if busy:
            now = _now_ms()
            for (attempts, status), group in _by_attempts_and_status(busy).items():
                reason = f"0x{status:04X} {status_meaning(status)}: tried again later"
                self._journal.outbox_retry(group, now + int(backoff_s(attempts, self._config) * 1000), status, reason)
            if not count:  # the PACS takes nothing now: the sender waits too
                self._gate_ms = now + int(min(backoff_s(i.attempts + 1, self._config) for i, _ in busy) * 1000)
                status = busy[0][1]
                self._trouble_begins(f"it is out of resources (0x{status:04X} {status_meaning(status)})")

    def _not_sent(self, items: list[OutboxItem], why: str) -> None:
        """No answer for these: each waits out its back-off, and the sender waits out the shortest of them."""
        now = _now_ms()
        groups: dict[int, list[int]] = defaultdict(list)
        for item in items:
            groups[item.attempts + 1].append(item.id)
        for attempts, ids in groups.items():
            self._journal.outbox_retry(ids, now + int(backoff_s(attempts, self._config) * 1000), None, why)
        self._gate_ms = now + int(backoff_s(min(groups), self._config) * 1000)
        self._trouble_begins(why)

    def _refuse(self, refusal: _Refusal) -> None:
        self._journal.outbox_refused(refusal.item.id, refusal.status, refusal.reason)
        log.error(
            "outbox: report %s for the PACS %s refused with 0x%04X (%s)%s; it is set aside, the others go on",
            hashed(refusal.item.sop_instance_uid),
            self._peer,
            refusal.status,
            status_meaning(refusal.status),
            f", before sending: {refusal.reason}" if refusal.here else "",
        )
        if self._observer is not None:
            self._observer.on_refused(refusal.status)

    def _association_failure(self, heard: _Heard) -> str:
        if not heard.connected:
            return "no connection to the PACS (refused, unreachable, timed out, or a failed TLS handshake)"
        if heard.rejected is not None:
            return f"the PACS rejected the association ({heard.rejected})"
        if heard.aborted:
            return "the PACS aborted the association request"
        return f"the PACS did not answer the association request in {self._config.timeout_s:.0f} s"

    # --- outages ------------------------------------------------------------------------------------

    def _trouble_begins(self, why: str) -> None:
        if self._trouble is None:
            pending, _ = self._journal.outbox_depth()
            log.warning(
                "outbox: the PACS %s takes no reports now: %s; %d wait in the outbox, tried again from %g s "
                "up to every %g s",
                self._peer,
                why,
                pending,
                self._config.retry_s,
                self._config.retry_max_s,
            )
        else:
            log.debug("outbox: still nothing sent to the PACS %s: %s", self._peer, why)
        self._trouble = why

    def _answers_again(self) -> None:
        if self._trouble is None and self._answered:
            return
        # Everything still sitting out a back-off goes now, rather than each object after its own wait.
        self._journal.outbox_hasten(_now_ms())
        self._gate_ms = 0
        if self._trouble is not None:
            pending, _ = self._journal.outbox_depth()
            log.info("outbox: the PACS %s answers again; %d reports still to send go now", self._peer, pending)
        self._trouble = None
        self._answered = True

    def _report_depth(self) -> None:
        if self._observer is None:
            return
        pending, oldest_ms = self._journal.outbox_depth()
        age = max(_now_ms() - oldest_ms, 0) / 1000 if oldest_ms is not None else 0.0
        self._observer.on_depth(pending, age)


def _no_context(r: _Ready) -> str:
    return f"the PACS accepted no presentation context for SOP class {r.sop_class} ({r.transfer_syntax})"


def _by_attempts_and_status(busy: list[tuple[OutboxItem, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for item, status in busy:
        groups[(item.attempts + 1, status)].append(item.id)
    return groups
