"""DICOM PDUs a test writes itself on an association's raw socket: a C-STORE's command set and the data set
fragments after it, as pynetdicom encodes them, so a test can send what no well-behaved SCU would; and an
A-ASSOCIATE-RQ whose answer is read off the wire."""

from __future__ import annotations

import io
import socket
import struct

from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

MAX_PDU = 1 << 20  # the fragment size the command set is cut to: what the receiver advertises


def p_data_tf(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one fragment (``control``: 0 a data set's, 1 a command set's, +2 the last)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, bytes([control]) + data]]  # type: ignore[list-item]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def store_command(context_id: int, sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ's whole command set, in P-DATA-TF PDUs; the data set is the test's to send."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(b"\x00")  # says a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return b"".join(
        p_data_tf(context_id, data[0], data[1:])
        for primitive in message.encode_msg(context_id, MAX_PDU)
        for _, data in primitive.presentation_data_value_list
        if data[0] & 1
    )


def associate_rq(calling: str, called: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"  # the DICOM application context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = MAX_PDU
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def rejection(port: int, calling: str, called: str, source: str = "127.0.0.1") -> tuple[int, int, int]:
    """Ask for an association from ``source``; the A-ASSOCIATE-RJ's result, source and reason. Read off the
    socket, because pynetdicom's requestor takes a rejection that closes the connection before its own thread
    looks for it as a failure to connect (its ``is_rejected`` then stays False)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as sock:
        sock.sendall(associate_rq(calling, called))
        answer = b""
        while len(answer) < 10:
            chunk = sock.recv(10 - len(answer))
            assert chunk, f"the connection closed after {answer!r}, with no A-ASSOCIATE-RJ"
            answer += chunk
    pdu_type, length = struct.unpack(">BxL", answer[:6])
    assert (pdu_type, length) == (0x03, 4), f"PDU type 0x{pdu_type:02X} answered, not an A-ASSOCIATE-RJ"
    return answer[7], answer[8], answer[9]
