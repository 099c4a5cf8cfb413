"""pynetdicom's side of an admitted DICOM connection, bounded: the A-ASSOCIATE-RQ the front already read is
replayed to it, and every later read and write has a deadline and every PDU a cap on its declared length.

pynetdicom 3.0.4 reads a PDU as ``socket.recv(6)`` then ``socket.recv(pdu_length)`` (dul.py,
``DULServiceProvider._read_pdu_data``) through ``AssociationSocket.recv`` (transport.py), which loops on a
blocking socket with no timeout and no bound: a peer could stall its reactor for good or make it buffer
4 GiB. Here the socket refuses a length past the cap before reading any of it and gives up on a PDU not
whole within the timeout; either way it aborts the association (A-ABORT, then the connection is shut), and
returns the short read, which pynetdicom takes as the connection closed (its event 17). Each message's
size, and how many whole ones wait, are bounded one layer up, by the association's DIMSE provider
(appliance.intake.dicom_spool), which aborts through the same socket."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

from appliance.intake import dicom_pdu as pdu
from appliance.intake.dicom_admission import Refusal
from appliance.intake.dicom_spool import Spool, SpoolingDimse


class Report(Protocol):
    """Log and count a refusal that ends an accepted association (the front's refusal log)."""

    def __call__(self, refusal: Refusal, *, detail: str = "") -> None: ...


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that serves the replayed bytes first and bounds every read and write."""

    _replay: bytearray
    _largest: Callable[[int], int]
    _timeout_s: float
    _report: Report
    _body_of: int | None  # the type of the PDU whose header was just read: its body comes next

    @classmethod
    def adopt(
        cls, sock: AssociationSocket, replay: bytes, largest: Callable[[int], int], timeout_s: float, report: Report
    ) -> BoundedSocket:
        """Bound the socket pynetdicom made for an association before the association starts (its
        constructor also queues the association's first event, so it is taken over rather than made anew)."""
        sock.__class__ = cls
        bounded = cast(BoundedSocket, sock)
        bounded._replay = bytearray(replay)
        bounded._largest = largest
        bounded._timeout_s = timeout_s
        bounded._report = report
        bounded._body_of = None
        return bounded

    @property
    def ready(self) -> bool:
        if self._replay and self.socket is not None:
            return True
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        body_of, self._body_of = self._body_of, None
        if body_of is not None and nr_bytes > self._largest(body_of):
            self.abort(Refusal.PDU_TOO_LARGE, pdu.INVALID_PARAMETER_VALUE)
            return bytearray()
        data = bytearray(self._replay[:nr_bytes])
        del self._replay[: len(data)]
        if len(data) < nr_bytes and self.socket is not None:
            try:
                data += pdu.read_until(self.socket, nr_bytes - len(data), time.monotonic() + self._timeout_s)
            except TimeoutError:
                self.abort(Refusal.NETWORK_TIMEOUT, pdu.REASON_NOT_SPECIFIED)
            except OSError:
                pass  # reset or shut: the short read says the connection closed
        if body_of is None and nr_bytes == pdu.HEADER_SIZE and len(data) == pdu.HEADER_SIZE:
            pdu_type, _ = pdu.header(bytes(data))
            if pdu_type in pdu.KNOWN_TYPES:  # pynetdicom reads the body next; an unknown type, it aborts
                self._body_of = pdu_type
        return data

    def send(self, bytestream: bytes) -> None:
        """As pynetdicom's send, with a deadline on the whole PDU (sendall's timeout is for all of it)."""
        sock = self.socket
        try:
            if sock is None:
                raise OSError("not connected")
            sock.settimeout(self._timeout_s)
            sock.sendall(bytestream)
        except TimeoutError:
            self._report(Refusal.NETWORK_TIMEOUT)
            self._shut()
            self.event_queue.put("Evt17")  # transport connection closed
            return
        except OSError:
            self.event_queue.put("Evt17")
            return
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})

    def abort(self, refusal: Refusal, reason: int, detail: str = "") -> None:
        """Say A-ABORT (best effort, briefly) and shut the connection: the peer stops sending at once, and
        pynetdicom's next read finds the connection closed."""
        self._report(refusal, detail=detail)
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(pdu.abort(reason))
        self._shut()

    def _shut(self) -> None:
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Handoff(RequestHandler):
    """pynetdicom's request handler for a connection the front admitted: the association it starts runs on
    a BoundedSocket holding the request already read, and writes each C-STORE's data set to the spool as it
    arrives (SpoolingDimse). ``association`` is that association, once started."""

    def __init__(
        self,
        request: socket.socket,
        client_address: Any,
        server: Any,
        *,
        replay: bytes,
        largest: Callable[[int], int],
        timeout_s: float,
        report: Report,
        spool: Spool,
    ) -> None:
        self._replay = replay
        self._spool = spool
        self._largest = largest
        self._timeout_s = timeout_s
        self._report = report
        self.association: Association | None = None
        super().__init__(request, client_address, server)  # handles the request: starts the association

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        plain = cast(AssociationSocket, assoc.dul.socket)
        bounded = BoundedSocket.adopt(plain, self._replay, self._largest, self._timeout_s, self._report)

        def end(refusal: Refusal, detail: str) -> None:
            bounded.abort(refusal, pdu.REASON_NOT_SPECIFIED, detail)

        SpoolingDimse.adopt(assoc.dimse, self._spool, end)
        self.association = assoc
        return assoc
