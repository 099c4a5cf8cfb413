"""A C-STORE's data set written into the spool folder as it arrives, never gathered in memory: within a cap on
one message's size and the spool disk's free space, then hashed and moved into place durably once whole.

pynetdicom 3.0.4 gathers a DIMSE message's fragments in a BytesIO until the last one (dimse_messages.py,
``DIMSEMessage.decode_msg``): anyone who may associate could make it hold a data set of many GB. Its remedy,
``_config.STORE_RECV_CHUNKED_DATASET``, is process-wide (the outbox's associations too) and writes to the
system's temporary folder, where an aborted association's part is never removed. Here each accepted
association's DIMSE provider gives decode_msg, as soon as a C-STORE-RQ's command set is whole, a file of ours
in the spool folder, in the very attribute that flag would fill (``_data_set_file``): decode_msg writes each
fragment into it, the handler finds it at ``Event.dataset_path``, and pynetdicom closes and unlinks what the
handler leaves, as it does its own. The file holds what the receiver always spooled: a file meta made only of
the request (SOP class and instance, the context's transfer syntax, pynetdicom's implementation UID, as
``Event.encoded_dataset`` makes it), then the data set's bytes as the scanner encoded them.

Each message is bounded, and so is how many wait: pynetdicom queues every whole message for the
association's thread (``DIMSEServiceProvider.msg_queue``, unbounded), which answers some 1,000 a second,
while one 1 MiB P-DATA-TF holds some 14,000 C-ECHO-RQs. A peer that sends without reading the answers filled
memory at 3 MiB a second (1.2 GiB after five minutes); now it is aborted once more than a few wait."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA

from appliance.files.content_hash import digest_stream
from appliance.files.durable import AtomicWriter
from appliance.files.spool import receive as receive_copy
from appliance.intake.dicom_admission import Refusal

SOURCE = "dicom"  # the way in, as the journal and the spool's names say it
# A command set is some 200 bytes, and only a C-STORE-RQ brings a data set worth spooling (this receiver serves
# C-ECHO and C-STORE): anything else is held in memory, so it is held to this.
MAX_OTHER = 64 * 1024
# Whole messages waiting for the association's thread. It negotiates one operation at a time (asynchronous
# operations window 1): a scanner waits for each answer, so one waits, or two as the thread takes it.
MAX_WAITING = 8
SERVED = (C_ECHO_RQ, C_STORE_RQ, C_CANCEL_RQ)  # what a scanner may send this receiver

# Why a data set was not kept: a sentence (no room, said as the receiver says it), or the failure itself.
Trouble = str | Exception


@dataclass(frozen=True)
class Spool:
    """Where and within what a C-STORE's data set is written as it arrives."""

    folder: Path
    max_bytes: int  # one message's command and data set together (limits.max_file_mb)
    room: Callable[[int], str | None]  # why ``n`` more bytes cannot be kept now, or None


@dataclass(frozen=True)
class Kept:
    """A data set moved into place: its path in the spool, its size and content hash (of the whole file)."""

    path: Path
    size: int
    content_hash: str


class SpoolingDimse(DIMSEServiceProvider):
    """An association's DIMSE provider that counts each message as its fragments arrive and writes a
    C-STORE-RQ's data set to a file in the spool. Past the cap on a message, or on the whole messages
    waiting for the association's thread, it ends the association through ``abort`` (the bounded socket's
    A-ABORT) and takes nothing more; without room, or where the file cannot be written, it takes the rest
    of the data set unkept and says why to the handler (``received``)."""

    _spool: Spool
    _abort: Callable[[Refusal, str], None]
    _size: int  # bytes of the message in progress
    _trouble: Trouble | None  # why the message in progress is not being kept
    _ended: bool  # aborted: nothing more is taken
    _parts: dict[Path, AtomicWriter]  # by temporary path: data sets written for this association, not yet kept
    _troubles: dict[int, Trouble]  # by message ID: C-STOREs whole but not kept, until their handler asks

    @classmethod
    def adopt(cls, dimse: DIMSEServiceProvider, spool: Spool, abort: Callable[[Refusal, str], None]) -> SpoolingDimse:
        """Take over the provider pynetdicom made for an association before the association starts."""
        dimse.__class__ = cls
        adopted = cast(SpoolingDimse, dimse)
        adopted._spool = spool
        adopted._abort = abort
        adopted._size = 0
        adopted._trouble = None
        adopted._ended = False
        adopted._parts = {}
        adopted._troubles = {}
        return adopted

    def receive_primitive(self, primitive: P_DATA) -> None:
        # One fragment at a time: the file must be in place before the first data set fragment that follows
        # the command set's last, which may come in the same P-DATA.
        for context_id, data in primitive.presentation_data_value_list:
            if self._ended:
                return
            self._take(int(context_id), bytes(data))

    def _take(self, context_id: int, data: bytes) -> None:
        if self.message is None:  # a new message
            self._size, self._trouble = 0, None
        storing = isinstance(self.message, C_STORE_RQ)  # its command set whole: the data set follows
        self._size += len(data) - 1
        limit = self._spool.max_bytes if storing else MAX_OTHER
        if self._size > limit:
            self.close()
            self._abort(Refusal.MESSAGE_TOO_LARGE, f"more than {limit} bytes in one message")
            return
        if storing and self._trouble is None and not data[0] & 1:
            problem = self._spool.room(len(data) - 1)
            if problem is not None:
                self._drop(problem)
        if self._trouble is not None and storing:
            data = data[:1]  # the rest of a data set not kept: counted, never held
        if self.message is None:
            self.message = DIMSEMessage()  # as pynetdicom would make it: held here to see what it becomes
        message = self.message
        try:
            super().receive_primitive(_fragment(context_id, data))
        except OSError as e:  # the fragment's write failed (a full disk): nothing else of it was taken
            if not storing or self._trouble is not None:
                raise
            self._drop(e)
            super().receive_primitive(_fragment(context_id, data[:1]))
        if type(message) is not DIMSEMessage and not isinstance(message, SERVED):  # its command set says what
            # pynetdicom serves an N-EVENT-REPORT-RQ on a thread of its own as it arrives, whatever the contexts:
            # one P-DATA could start thousands. Only what this receiver serves goes on.
            self.close()
            self._abort(Refusal.UNEXPECTED_MESSAGE, f"a {type(message).__name__}")
            return
        if self.message is None:  # whole: handed to the association's queue
            if storing and self._trouble is not None:
                self._troubles[int(message.command_set.MessageID)] = self._trouble
            waiting = self.msg_queue.qsize()
            if waiting > MAX_WAITING:
                self.close()
                self._abort(Refusal.TOO_MANY_MESSAGES, f"{waiting} waiting, more than {MAX_WAITING}")
        elif isinstance(self.message, C_STORE_RQ) and not storing:
            self._open(self.message, context_id)

    def _open(self, message: C_STORE_RQ, context_id: int) -> None:
        """The file the data set is written to, starting with its file meta; or why not. A data set still
        arriving is a temporary file in the spool (one a crash left, the next start clears)."""
        part: AtomicWriter | None = None
        try:
            command = message.command_set
            [context] = [cx for cx in self.assoc.accepted_contexts if cx.context_id == context_id]
            meta = create_file_meta(
                sop_class_uid=UID(command.AffectedSOPClassUID),
                sop_instance_uid=UID(command.AffectedSOPInstanceUID),
                transfer_syntax=UID(context.transfer_syntax[0]),
            )
            head = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
            problem = self._spool.room(len(head))
            if problem is not None:
                self._trouble = problem
                return
            part = receive_copy(self._spool.folder, SOURCE, ".dcm")
            self._parts[part.temporary] = part
            part.file.write(head)
        except Exception as e:  # a failed write, or a request no file meta can be made of: answered 0xA700
            self._trouble = e
            if part is not None:
                self.discard(part.temporary)
            return
        # decode_msg writes each data set fragment to it (a NamedTemporaryFile, as its own would be), and
        # message_to_primitive hands its path to the handler; pynetdicom closes it, after the handler.
        message._data_set_file = cast(Any, part.file)
        message._data_set_path = part.temporary

    def _drop(self, trouble: Trouble) -> None:
        """Stop keeping the data set in progress: its file goes, the rest of it is taken unkept."""
        self._trouble = trouble
        message = self.message
        part = getattr(message, "_data_set_path", None)
        if message is not None and part is not None:
            message._data_set_file = None
            message._data_set_path = None
            self.discard(part)

    def discard(self, part: Path) -> None:
        """Remove a data set's file that no handler will keep (gone already is fine)."""
        writer = self._parts.pop(part, None)
        if writer is not None:
            writer.discard()

    def received(self, event: Event) -> Path | Trouble:
        """For the C-STORE handler: the file its data set was written to, or why it was not kept."""
        request = cast(C_STORE, event.request)
        trouble = self._troubles.pop(int(request.MessageID or 0), None)
        if trouble is not None:
            return trouble
        path = request._dataset_path
        if not isinstance(path, Path):  # a C-STORE-RQ without a data set: nothing to keep
            return "no data set"
        return path

    def keep(self, part: Path) -> Kept:
        """Move a whole data set's file into place durably (fsync, rename to its ``.dcm`` name, fsync of the
        folder), hashed as it is read back; OSError where any step fails (nothing of it is then left)."""
        writer = self._parts.pop(part, None)
        if writer is None:  # the association ended meanwhile, and took its files with it
            raise FileNotFoundError(errno.ENOENT, "the association ended", str(part))
        try:
            with open(part, "rb") as f:
                content_hash = digest_stream(f)
                size = f.tell()
            writer.commit()
        except BaseException:
            writer.discard()
            remove(writer.path)
            raise
        return Kept(writer.path, size, content_hash)

    def close(self) -> None:
        """Take nothing more and remove what this association wrote and no handler kept (the message in
        progress, and any queued that no handler will now see)."""
        self._ended = True
        self._drop("the association ended")
        for part in list(self._parts):
            self.discard(part)
        self._troubles.clear()


def spooling(assoc: Association) -> SpoolingDimse:
    """An association's provider (every association the receiver accepts spools)."""
    dimse = assoc.dimse
    if not isinstance(dimse, SpoolingDimse):
        raise TypeError("an association without the spooling DIMSE provider")
    return dimse


def _fragment(context_id: int, data: bytes) -> P_DATA:
    one = P_DATA()
    one.presentation_data_value_list = [cast(Any, [context_id, data])]  # a list, as its setter checks
    return one


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone already, or its folder is (the spool replaced under us)
        path.unlink()
