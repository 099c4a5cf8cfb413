"""The DICOM receiver's front: every connection bounded before it is trusted. It counts connections per host
at accept, shakes hands (TLS) and reads the A-ASSOCIATE-RQ itself within a deadline and a size cap, decides
who may send (allowed callers, per-AE and global caps) and answers a refusal with its own A-ASSOCIATE-RJ;
only an admitted connection reaches pynetdicom, its request replayed, on a bounded socket.

Why in front of pynetdicom 3.0.4 rather than through it: its server starts an Association (counted against
maximum_associations) at accept, before any request, and its reads have no timeout and no length bound
(transport.py ``AssociationSocket.recv``, dul.py ``DULServiceProvider._read_pdu_data``)."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import socketserver
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import DicomConfig
from appliance.intake import dicom_pdu as pdu
from appliance.intake.dicom_admission import Admission, Callers, Connection, Refusal, RefusalLog
from appliance.intake.dicom_spool import Spool, spooling
from appliance.intake.dicom_transport import Handoff
from appliance.privacy import log_failure

log = logging.getLogger("appliance.intake.dicom_receiver")

MAX_PDU = 1 << 20  # bytes a scanner may send in one PDU: the maximum length this receiver advertises

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # rejected permanent, by the service user: an unknown caller...
CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected transient, by the presentation service provider
_REJECT = {
    Refusal.CALLING_AE: CALLING_AE_NOT_RECOGNISED,
    Refusal.AE_HOST: CALLING_AE_NOT_RECOGNISED,  # a known caller from another host learns no more than a stranger
    Refusal.CALLED_AE: CALLED_AE_NOT_RECOGNISED,
    Refusal.AE_LIMIT: LOCAL_LIMIT_EXCEEDED,
    Refusal.LIMIT: LOCAL_LIMIT_EXCEEDED,
    Refusal.PENDING_FULL: LOCAL_LIMIT_EXCEEDED,
}


@dataclass
class Front:
    """What the front decides with: the receiver's settings, its callers, the counts, the refusal log, TLS;
    and where an admitted association's data sets are written as they arrive."""

    config: DicomConfig
    callers: Callers
    refusals: RefusalLog
    spool: Spool
    tls: ssl.SSLContext | None = None
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config)


class FrontServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the front in its accept loop (the caps per host and on pending
    connections, decided without a thread) and in each connection's thread (handshake, request, admission,
    then pynetdicom's association, whose end releases the connection's counts). Made by pynetdicom's
    ``AE.make_server(..., server_class=FrontServer, front=Front(...))``."""

    daemon_threads = True  # a connection's thread is never joined: stop aborts its association
    # socketserver listens with a backlog of 5: a burst of connections would leave a scanner's SYN unanswered
    # for a second or more; the front, not the kernel's queue, is what refuses.
    request_queue_size = 128

    def __init__(self, *args: Any, front: Front, **kwargs: Any) -> None:
        self.front = front
        # From the accept loop to the connection's thread, which socketserver hands only the socket.
        self._conns: dict[socket.socket, Connection] = {}
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # pynetdicom's shakes TLS hands here, in the accept loop, with no timeout: each connection's own thread does.
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        conn, evicted = self.front.admission.open(client_address[0], request)
        if conn is None:
            self.front.refusals.report(Refusal.HOST_LIMIT, client_address[0])
            return False
        self._conns[request] = conn
        if evicted is not None:
            self.front.refusals.report(Refusal.PENDING_FULL, evicted.host)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: the counts it holds go now (the socket is shut by the caller)
            self.front.admission.close(self._conns.pop(request))
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = self._conns.pop(request)
        try:
            self._serve(conn, request, client_address)
        except Exception as e:  # the error boundary: one connection never stops the receiver
            # By type only: the text of an error raised on a peer's bytes may quote them.
            log_failure(log, "DICOM: a connection from %s failed", conn.host, error=e)
            self.shutdown_request(conn.sock)
        finally:
            self.front.admission.close(conn)

    def _serve(self, conn: Connection, request: socket.socket, client_address: Any) -> None:
        if self.front.tls is not None:
            try:
                # Before trust, the request's deadline; ssl's handshake takes a socket timeout as its deadline
                # for the whole of it, however the peer trickles its records (_ssl.c, do_handshake).
                request.settimeout(self.front.config.request_timeout_s)
                # wrap_socket detaches the plain socket (its fd becomes -1): the handshake is shaken only once
                # an eviction can reach the TLS socket, or an evicted connection would wait out the deadline.
                wrapped = self.front.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                request = wrapped
                if not self.front.admission.wrap(conn, wrapped):
                    self.shutdown_request(wrapped)
                    return
                wrapped.do_handshake()
            except OSError as e:  # ssl.SSLError, a timeout, a reset
                self._refuse(conn, Refusal.TLS, detail=_tls_reason(e))
                self.shutdown_request(conn.sock)
                return
        message = _read_request(request, self.front.config.request_timeout_s, self._max_request)
        if isinstance(message, tuple):
            refusal, detail, answer = message
            self._refuse(conn, refusal, detail=detail)
            if answer:
                _say(request, answer)
            self.shutdown_request(request)
            return
        called, calling = pdu.titles(message)
        denied = self.front.callers.refusal(called, calling, conn.host) or self.front.admission.admit(conn, calling)
        if denied is not None:
            self._refuse(conn, denied, calling)
            _say(request, pdu.associate_rj(*_REJECT[denied]))
            self.shutdown_request(request)
            return
        handler = Handoff(
            request,
            client_address,
            self,
            replay=message,
            largest=functools.partial(pdu.largest, max_request=self._max_request, max_pdu=MAX_PDU),
            timeout_s=self.front.config.timeout_s,
            report=functools.partial(self._refuse, conn, calling=calling),
            spool=self.front.spool,
        )
        assoc = handler.association
        if assoc is None:
            return
        assoc.join()  # the association's counts are held until it ends
        spooling(assoc).close()  # what it was sending when it ended, and any store no handler will see
        self.shutdown_request(request)
        if assoc.is_aborted and assoc.dul.idle_timer_expired():
            self._refuse(conn, Refusal.IDLE, calling)

    def _refuse(self, conn: Connection, refusal: Refusal, calling: str | None = None, detail: str = "") -> None:
        if conn.evicted and not refusal.aborts:
            return  # said when it was evicted: this is only its end
        self.front.refusals.report(refusal, conn.host, calling, detail)

    @property
    def _max_request(self) -> int:
        return self.front.config.max_request_kb * 1024

    def shutdown(self) -> None:
        # pynetdicom's shutdown also takes the server off its AE's list, where only start_server puts it.
        socketserver.BaseServer.shutdown(self)  # stop the accept loop
        self.server_close()
        self.front.refusals.close()


def _read_request(sock: socket.socket, timeout_s: float, max_length: int) -> bytes | tuple[Refusal, str, bytes]:
    """The whole A-ASSOCIATE-RQ within the time and the cap, or why not: the refusal, a detail, and the PDU
    to answer with (A-ABORT for a PDU that is no request, PS3.8 9.2 state 2; nothing to a silent peer)."""
    deadline = time.monotonic() + timeout_s
    try:
        head = pdu.read_until(sock, pdu.HEADER_SIZE, deadline)
        if len(head) < pdu.HEADER_SIZE:
            return Refusal.CLOSED, "", b""
        pdu_type, length = pdu.header(head)
        if pdu_type != pdu.ASSOCIATE_RQ:
            reason = pdu.UNEXPECTED_PDU if pdu_type in pdu.KNOWN_TYPES else pdu.UNRECOGNISED_PDU
            return (
                Refusal.NOT_A_REQUEST,
                f"PDU type 0x{pdu_type:02X}",
                b"" if pdu_type == pdu.ABORT else pdu.abort(reason),
            )
        if length > max_length:
            return Refusal.REQUEST_TOO_LARGE, f"{length} bytes declared", pdu.abort(pdu.INVALID_PARAMETER_VALUE)
        if length < pdu.REQUEST_FIXED_SIZE:
            return Refusal.NOT_A_REQUEST, f"{length} bytes declared", pdu.abort(pdu.INVALID_PARAMETER_VALUE)
        body = pdu.read_until(sock, length, deadline)
    except TimeoutError:
        return Refusal.REQUEST_TIMEOUT, "", b""
    except OSError:
        return Refusal.CLOSED, "", b""
    if len(body) < length:
        return Refusal.CLOSED, "", b""
    return head + body


def _say(sock: socket.socket, data: bytes) -> None:
    """Send a last PDU, briefly and best effort, then stop sending: the peer reads it before the close."""
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def _tls_reason(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error.reason or type(error).__name__)
    if isinstance(error, TimeoutError):
        return "no TLS handshake within dicom.request_timeout_s"
    return error.strerror or type(error).__name__
