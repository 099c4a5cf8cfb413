"""DICOM PDUs a test writes itself on an association's raw socket: a C-STORE's command set and the data set
fragments after it, as pynetdicom encodes them, so a test can send what no well-behaved SCU would."""

from __future__ import annotations

import io

from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

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
