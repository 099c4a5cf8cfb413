"""The few DICOM Upper Layer PDUs (PS3.8 9.3) the receiver reads and writes itself, before a peer is trusted:
the A-ASSOCIATE-RQ's header and fixed fields, A-ASSOCIATE-RJ and A-ABORT, and reads bound by a deadline."""

from __future__ import annotations

import re
import socket
import struct
import time

HEADER_SIZE = 6  # type (1), reserved (1), length of what follows (4, big-endian)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
KNOWN_TYPES = frozenset(range(ASSOCIATE_RQ, ABORT + 1))
_HEADER = struct.Struct(">BxL")
# After the header: protocol version (2), reserved (2), called AE title (16), calling AE title (16), reserved (32).
REQUEST_FIXED_SIZE = 68
_CALLED = slice(HEADER_SIZE + 4, HEADER_SIZE + 20)
_CALLING = slice(HEADER_SIZE + 20, HEADER_SIZE + 36)
_SMALL_PDU = 64  # A-RELEASE-RQ/RP and A-ABORT are 4 bytes long: anything much longer is not one
_READ_CHUNK = 64 * 1024
_AE_TITLE = re.compile(r"[ -~]{0,16}")  # printable ASCII: what PS3.5 allows in an AE title

# A-ABORT reasons when the source is the service provider (PS3.8 9.3.8)
REASON_NOT_SPECIFIED = 0x00
UNRECOGNISED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PARAMETER_VALUE = 0x06


def header(data: bytes) -> tuple[int, int]:
    """A PDU's type and the length it declares for what follows its 6-byte header."""
    pdu_type, length = _HEADER.unpack(data[:HEADER_SIZE])
    return int(pdu_type), int(length)


def largest(pdu_type: int, max_request: int, max_pdu: int) -> int:
    """The longest a PDU of this type may declare itself on an accepted association: P-DATA-TF up to the
    maximum this receiver advertised, association PDUs up to the request's cap, the rest a few bytes."""
    if pdu_type == P_DATA_TF:
        return max_pdu
    if pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ):
        return max_request
    return _SMALL_PDU


def titles(request: bytes) -> tuple[str, str]:
    """The (called, calling) AE titles from a whole A-ASSOCIATE-RQ's fixed fields, spaces (and the NULs some
    senders pad with) stripped; a title that is not printable ASCII comes back as it is, to match nothing."""
    return _title(request[_CALLED]), _title(request[_CALLING])


def _title(field: bytes) -> str:
    return field.decode("latin-1").strip(" \x00")


def printable(title: str) -> str:
    """An AE title fit for a log line (a peer's bytes: no newline may forge a line)."""
    text = str(title).strip()
    return repr(text) if _AE_TITLE.fullmatch(text) else "(invalid AE title)"


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return _HEADER.pack(ASSOCIATE_RJ, 4) + bytes((0, result, source, diagnostic))


def abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2), PS3.8 9.3.8."""
    return _HEADER.pack(ABORT, 4) + bytes((0, 0, 0x02, reason))


def read_until(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes, all of them unless the peer closes first (then fewer); TimeoutError once the
    monotonic ``deadline`` passes, however the peer trickles them."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - len(data), _READ_CHUNK))
        if not chunk:
            break
        data += chunk
    return bytes(data)
