"""The DICOM way in: a C-ECHO and C-STORE SCP (pynetdicom) that spools each instance durably and hands it to
the one intake, answering the scanner only once the instance is on disk and in the journal.

The handler never decodes pixels and never scores: the scanner waits on its answer. What it stores is the
data set exactly as the scanner encoded it, behind a file meta built only from the request (SOP class,
SOP instance, transfer syntax) and pynetdicom's implementation UID, written to the spool as it arrives
(appliance.intake.dicom_spool) and moved into place once whole: a scanner that sends an instance again
sends the same bytes, and the intake's content dedupe scores it once. (Another sender, or another transfer
syntax, encodes the same instance differently: DCMTK re-encodes, pynetdicom sends a file's bytes as they are.)
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
from pathlib import Path
from typing import cast

import pydicom.pixels as px
from pydicom import uid as dcm_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.config import DicomConfig, LimitsConfig, is_loopback
from appliance.domain.errors import ConfigError
from appliance.domain.faults import Faults, is_disk_full
from appliance.files.spool import prepare as prepare_spool
from appliance.intake.dicom_admission import Callers, NoRefusalObserver, RefusalLog, RefusalObserver
from appliance.intake.dicom_front import MAX_PDU, Front, FrontServer
from appliance.intake.dicom_pdu import printable as _ae_title
from appliance.intake.dicom_spool import SOURCE, Spool, remove, spooling
from appliance.intake.intake import Arrival, Intake
from appliance.log_throttle import LogThrottle
from appliance.privacy import hashed, log_failure

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: Refused, out of resources (the scanner keeps the image and retries)
STOP_WAIT_S = 10.0  # at stop, C-STOREs in flight may finish this long; the rest are not acknowledged
_MIB = 1024 * 1024
_UID = re.compile(r"[0-9]{1,64}(\.[0-9]{1,64}){0,63}")


def _accepted_syntaxes() -> list[str]:
    """The transfer syntaxes the readers decode here: native ones, Deflated (inflated by the reader within
    bounds), and each compressed one whose pydicom decoder is installed. An SCU offering another gets no
    context for it, so it can convert before sending, instead of sending what would be rejected later."""
    syntaxes = []
    for syntax in ALL_TRANSFER_SYNTAXES:
        try:
            available = px.get_decoder(dcm_uid.UID(syntax)).is_available
        except NotImplementedError:
            available = False
        if available:
            syntaxes.append(syntax)
    return syntaxes


def _tls_context(config: DicomConfig) -> ssl.SSLContext | None:
    """The server side of DICOM TLS (PS3.15 B.9: TLS 1.2 or later); with tls_client_ca, a scanner must
    present a certificate signed by it."""
    if config.tls_cert is None or config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("dicom.tls_client_ca needs dicom.tls_cert and dicom.tls_key too.")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if config.tls_key.stat().st_mode & 0o077:
            raise ConfigError(f"dicom.tls_key: {config.tls_key} is readable by other users; chmod 600 it.")
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as e:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"dicom.tls_cert/tls_key: cannot load {config.tls_cert} with {config.tls_key} "
            f"({e.strerror or getattr(e, 'reason', None) or type(e).__name__})."
        ) from e
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except OSError as e:
            raise ConfigError(
                f"dicom.tls_client_ca: cannot load {config.tls_client_ca} "
                f"({e.strerror or getattr(e, 'reason', None) or type(e).__name__})."
            ) from e
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class DicomReceiver:
    """C-ECHO and C-STORE SCP for the scanners in ``config.allowed``; each instance is spooled to
    ``spool_dir`` as it arrives and submitted to ``intake`` before it is acknowledged. Below ``min_free_mb``
    on the spool's disk, or while a fault holds intake back, C-STOREs are refused with 0xA700; one past
    ``max_file_mb`` (limits.max_file_mb) ends its association there. Every connection passes the front
    (appliance.intake.dicom_front) first; its refusals go to ``observer`` too."""

    def __init__(
        self,
        config: DicomConfig,
        intake: Intake,
        spool_dir: Path,
        faults: Faults,
        min_free_mb: int,
        observer: RefusalObserver | None = None,
        max_file_mb: float = LimitsConfig().max_file_mb,
    ) -> None:
        self.config = config
        self.intake = intake
        self.spool_dir = spool_dir
        self.faults = faults
        self.min_free = min_free_mb * _MIB
        self.observer = observer or NoRefusalObserver()
        self.max_bytes = int(max_file_mb * _MIB)
        self._server: FrontServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._state = threading.Condition()
        self._closing = False
        self._in_flight = 0
        self._refusals = LogThrottle(log)  # a burst refused for want of space: one line, then a count a minute

    # --- start and stop ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in background threads; ConfigError (one sentence) for a busy port or bad TLS files."""
        config = self.config
        tls = _tls_context(config)
        callers = Callers(config)
        try:
            prepare_spool(self.spool_dir)
        except OSError as e:
            raise ConfigError(f"Cannot create the spool folder {self.spool_dir}: {e.strerror}.") from e

        ae = AE(ae_title=config.ae_title)
        syntaxes = _accepted_syntaxes()
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        # The front decides who may send and how many (and says why it refuses); the library's own checks
        # of the titles and its count stand behind it, and never refuse what the front let through.
        ae.require_calling_aet = callers.titles
        ae.require_called_aet = True
        ae.maximum_associations = config.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
        # pynetdicom's default of 16 KiB per PDU makes a 10 MB radiograph some 600 round trips through Python;
        # 1 MiB takes it at about 1.2-1.5x the rate (measured), and still bounds what one PDU may ask for.
        ae.maximum_pdu_size = MAX_PDU
        handlers: list[EventHandlerType] = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store)]
        spool = Spool(self.spool_dir, self.max_bytes, self._no_room)
        front = Front(config, callers, RefusalLog(config, self.observer), spool, tls)
        try:
            server = ae.make_server(
                (config.host, config.port), evt_handlers=handlers, server_class=FrontServer, front=front
            )
            assert isinstance(server, FrontServer)
        except OSError as e:
            raise ConfigError(
                f"The DICOM receiver cannot listen on {config.host}:{config.port} ({e.strerror}); "
                "free the port or change dicom.port."
            ) from e
        self._server = server
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
        self._thread.start()
        log.info(
            "DICOM receiver: AE %s on %s:%d (%s), %d callers allowed",
            _ae_title(config.ae_title),
            config.host,
            self.port,
            "TLS" if tls else "no TLS",
            len(config.allowed),
        )
        if tls is None and not is_loopback(config.host):
            log.warning(
                "DICOM receiver: listening on %s without TLS: images cross the network in the clear, and anyone "
                "who can reach the port and knows an allowed AE title can send; set dicom.tls_cert and "
                "dicom.tls_key, and bind each [[dicom.allowed]] caller to its host",
                config.host,
            )

    def stop(self) -> None:
        """Stop accepting; C-STOREs in flight finish (for up to STOP_WAIT_S) or are never acknowledged."""
        server = self._server
        if server is None:
            return
        with self._state:
            self._closing = True
        server.shutdown()
        with self._state:
            finished = self._state.wait_for(lambda: self._in_flight == 0, STOP_WAIT_S)
        if not finished:
            log.warning(
                "stopping the DICOM receiver with %d C-STOREs unanswered; scanners send them again", self._in_flight
            )
        for assoc in server.active_associations:
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)
        self._refusals.close()
        self._server = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._port

    # --- association --------------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        return SUCCESS

    # --- C-STORE ------------------------------------------------------------------------------------

    def _on_store(self, event: Event) -> int:
        """One instance: spool it durably, submit it, then answer. Every failure is a status, never a raise
        (pynetdicom would log the traceback, and the scanner would get 0xC211)."""
        with self._state:
            if self._closing:
                return OUT_OF_RESOURCES
            self._in_flight += 1
        try:
            return self._store(event)
        except Exception as e:  # the error boundary: one bad request never stops the receiver
            log_failure(log, "a C-STORE from AE %s failed", _ae_title(event.assoc.requestor.ae_title), error=e)
            return OUT_OF_RESOURCES
        finally:
            with self._state:
                self._in_flight -= 1
                self._state.notify_all()

    def _store(self, event: Event) -> int:
        calling = _ae_title(event.assoc.requestor.ae_title)
        instance = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        dimse = spooling(event.assoc)
        part = dimse.received(event)
        problem = part if isinstance(part, str) else None
        if isinstance(part, Path):
            problem = self._no_room(0)  # a fault said meanwhile (a damaged journal, a full disk elsewhere)
            if problem is not None:
                dimse.discard(part)
        if problem is not None:
            self._refusals.log(
                "refused C-STOREs (0xA700, out of resources)",
                "refused a C-STORE (0xA700, out of resources) from AE %s: %s",
                calling,
                problem,
            )
            return OUT_OF_RESOURCES
        try:
            if isinstance(part, Exception):
                raise part
            assert isinstance(part, Path)
            kept = dimse.keep(part)
        except OSError as e:
            if not self.faults.report(e):  # a full disk is said once, by the fault
                log.error("could not spool a C-STORE from AE %s (answered 0xA700): %s", calling, e.strerror)
            return OUT_OF_RESOURCES
        known = _UID.fullmatch(instance) is not None
        arrival = Arrival(
            source=SOURCE,
            path=kept.path,
            file_name=f"{instance}.dcm" if known else "instance.dcm",
            size=kept.size,
            content_hash=kept.content_hash,
            instance_uid=instance if known else None,  # the same instance in another encoding is not scored again
        )
        try:
            submitted = self.intake.submit(arrival)
        except Exception as e:
            self._forget(kept.path, kept.size)
            if not (is_disk_full(e) and self.faults.report(e)):
                log_failure(log, "could not journal a C-STORE from AE %s (answered 0xA700)", calling, error=e)
            return OUT_OF_RESOURCES
        again = " (received before: not scored again)" if submitted.duplicate_of is not None else ""
        log.debug("DICOM: input %d from AE %s, instance %s%s", submitted.input_id, calling, hashed(instance), again)
        return SUCCESS

    def _no_room(self, size: int) -> str | None:
        """Why an instance of ``size`` bytes cannot be kept now, or None."""
        refusal = self.faults.refusal()  # a full disk said by another room, a damaged journal
        if refusal is not None:
            return refusal
        try:
            st = os.statvfs(self.spool_dir)
        except OSError as e:
            return f"the spool folder cannot be checked ({e.strerror})"
        free = st.f_bavail * st.f_frsize
        if st.f_files and st.f_favail == 0:
            free = 0  # out of inodes
        if free - size >= self.min_free:
            return None
        # Said on health and GetStatus by the storage fault (when its folders share this disk, as the daemon's do).
        self.faults.check_storage()
        return f"{free / _MIB:.0f} MB free on the spool's disk, below storage.min_free_mb = {self.min_free // _MIB}"

    def _forget(self, path: Path, size: int) -> None:
        """After a failed submit: the spooled copy goes, unless the journal holds it (registered, then the
        admission failed): then the next start scores it, and the scanner's re-send is a duplicate."""
        try:
            journaled = self.intake.journal.find_file(str(path), size, 0) is not None
        except Exception:
            return  # cannot tell: the next start deletes it if no input refers to it
        if not journaled:
            remove(path)
