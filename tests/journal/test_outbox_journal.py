"""The journal's outbox on a real SQLite file: reports are stored with their results or not at all, and keep their
state across reopening, kill -9 and recovery."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.domain.delivery import Delivery, DeliveryState
from appliance.journal.integrity import open_journal, recover
from appliance.journal.journal import Journal, NewDelivery, NewResult

SR = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR Storage


def _report(n: int, size: int = 64) -> NewDelivery:
    return NewDelivery(sop_class_uid=SR, sop_instance_uid=f"2.25.{n}", payload=bytes([n % 256]) * size)


def _scored(j: Journal, name: str, *deliveries: NewDelivery) -> int:
    """Register an input and complete it with one result carrying ``deliveries``; returns its sequence number."""
    reg = j.register(source="folder", path=f"/in/{name}", file_name=name, size=1, mtime_ns=1, content_hash=name)
    result = NewResult(frame_index=0, outcome="scored", sop_uid=f"1.2.{name}", payload=b"p", deliveries=deliveries)
    seqs = j.complete(reg.input.id, [result])
    assert len(seqs) == 1
    return seqs[0]


def _outbox_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT result_seq, sop_instance_uid, state FROM outbox ORDER BY id").fetchall()


def test_a_report_is_stored_with_its_result_and_is_due_at_once(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    seq = _scored(j, "a", _report(1))
    plain = _scored(j, "b")  # a PNG input: no report
    due = j.outbox_due(now_ms=2**62, limit=10)
    assert [(i.result_seq, i.sop_class_uid, i.sop_instance_uid, i.payload, i.attempts) for i in due] == [
        (seq, SR, "2.25.1", _report(1).payload, 0)
    ]
    assert j.delivery_of(seq) == Delivery(DeliveryState.PENDING, 0, None, "", "2.25.1")
    assert j.delivery_of(plain) is None
    assert j.next_outbox_wake_ms() == due[0].created_ms  # due the moment it was stored
    j.close()


def test_results_not_committed_leave_no_report(tmp_path: Path) -> None:
    """A failure inside the results' transaction (here: the sequence reserve's disk write) rolls back their
    reports too, as a crash before COMMIT would: the input is still queued, and nothing waits for the PACS."""

    class FailingReserve:
        def ceiling(self) -> int:
            return 0

        def reserve(self, top: int, committed: int) -> None:
            raise OSError(28, "No space left on device")

        def closed(self, committed: int) -> None:
            pass

    j = Journal(tmp_path / "j.sqlite3", reserve=FailingReserve())
    reg = j.register(source="folder", path="/in/a", file_name="a", size=1, mtime_ns=1, content_hash="a")
    result = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.a", payload=b"p", deliveries=(_report(1),))
    with pytest.raises(OSError):
        j.complete(reg.input.id, [result])
    assert j.last_sequence() == 0
    assert [row.id for row in j.pending()] == [reg.input.id]
    assert j.outbox_depth() == (0, None)
    assert _outbox_rows(tmp_path / "j.sqlite3") == []


def test_kill_9_while_storing_never_splits_a_result_from_its_report(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    writer = textwrap.dedent(
        f"""
        from pathlib import Path
        from appliance.journal.journal import Journal, NewDelivery, NewResult
        j = Journal(Path({str(path)!r}))
        n = 0
        while True:
            n += 1
            reg = j.register(source="folder", path=f"/in/{{n}}", file_name=str(n), size=1, mtime_ns=1,
                             content_hash=str(n))
            report = NewDelivery("{SR}", f"2.25.{{n}}", b"x" * 2000)
            j.complete(reg.input.id, [NewResult(0, "scored", "1.2", b"p", deliveries=(report,))])
            if n == 20:
                print("stored", flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "stored"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    with sqlite3.connect(path) as db:
        results = [s for (s,) in db.execute("SELECT seq FROM results ORDER BY seq")]
        reported = [s for (s,) in db.execute("SELECT result_seq FROM outbox ORDER BY id")]
    assert len(results) >= 20
    assert reported == results  # each committed result has its report, and no report lacks its result


def test_an_input_finished_before_stores_no_second_report(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    reg = j.register(source="folder", path="/in/a", file_name="a", size=1, mtime_ns=1, content_hash="a")
    first = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.a", payload=b"p", deliveries=(_report(1),))
    replay = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.a", payload=b"p", deliveries=(_report(2),))
    assert j.complete(reg.input.id, [first]) == [1]
    assert j.complete(reg.input.id, [replay]) == []  # a replay after a crash: nothing stored, nothing sent twice
    assert [i.sop_instance_uid for i in j.outbox_due(2**62, 10)] == ["2.25.1"]


def test_due_retry_refused_delivered_and_depth(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    seqs = [_scored(j, f"f{n}", _report(n)) for n in range(1, 6)]
    items = j.outbox_due(2**62, 10)
    assert [i.sop_instance_uid for i in items] == [f"2.25.{n}" for n in range(1, 6)]  # oldest first
    assert [i.sop_instance_uid for i in j.outbox_due(2**62, 2)] == ["2.25.1", "2.25.2"]
    a, b, c, d, e = (i.id for i in items)
    oldest = items[0].created_ms
    assert j.outbox_depth() == (5, oldest)

    now = items[-1].created_ms
    j.outbox_retry([a, b], next_try_ms=now + 60_000, status=None, reason="no connection to the PACS")
    j.outbox_retry([c], next_try_ms=now + 5_000, status=0xA700, reason="0xA700 out of resources")
    j.outbox_refused(d, 0xC000, "0xC000 Cannot Understand")
    j.outbox_delivered([e])

    assert [i.id for i in j.outbox_due(now, 10)] == []
    assert [i.id for i in j.outbox_due(now + 5_000, 10)] == [c]
    assert [(i.id, i.attempts) for i in j.outbox_due(now + 60_000, 10)] == [(c, 1), (a, 1), (b, 1)]  # by due time
    assert j.next_outbox_wake_ms() == now + 5_000
    assert j.outbox_depth() == (3, oldest)  # refused and delivered no longer count

    assert j.delivery_of(seqs[0]) == Delivery(DeliveryState.PENDING, 1, None, "no connection to the PACS", "2.25.1")
    assert j.delivery_of(seqs[2]) == Delivery(DeliveryState.PENDING, 1, 0xA700, "0xA700 out of resources", "2.25.3")
    assert j.delivery_of(seqs[3]) == Delivery(DeliveryState.REFUSED, 1, 0xC000, "0xC000 Cannot Understand", "2.25.4")
    assert j.delivery_of(seqs[4]) == Delivery(DeliveryState.DELIVERED, 0, 0x0000, "", "2.25.5")

    # A second try: attempts keep counting; a refused or delivered object is not touched again.
    j.outbox_retry([a, d, e], next_try_ms=now + 120_000, status=None, reason="again")
    assert j.delivery_of(seqs[0]).attempts == 2  # type: ignore[union-attr]
    assert j.delivery_of(seqs[3]).state is DeliveryState.REFUSED  # type: ignore[union-attr]
    assert j.delivery_of(seqs[4]).state is DeliveryState.DELIVERED  # type: ignore[union-attr]

    # The PACS answers again: everything waiting out a back-off is due now.
    assert j.outbox_hasten(now) == 3
    assert [i.id for i in j.outbox_due(now, 10)] == [a, b, c]

    j.outbox_delivered([a, b, c], status=0xB000)  # a warning counts as delivered, and says which
    assert j.outbox_depth() == (0, None)
    assert j.next_outbox_wake_ms() is None
    assert j.delivery_of(seqs[1]) == Delivery(DeliveryState.DELIVERED, 1, 0xB000, "", "2.25.2")
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:  # delivered bytes are not kept; refused ones are
        sizes = dict(db.execute("SELECT sop_instance_uid, length(payload) FROM outbox").fetchall())
    assert sizes == {"2.25.1": 0, "2.25.2": 0, "2.25.3": 0, "2.25.4": 64, "2.25.5": 0}


def test_a_sop_instance_uid_is_queued_once(tmp_path: Path) -> None:
    """The same report made again (the same result for content scored again after a recovery) is the same
    instance: its result is stored, the report is not queued a second time."""
    j = Journal(tmp_path / "j.sqlite3")
    _scored(j, "a", _report(1))
    reg = j.register(source="folder", path="/in/b", file_name="b", size=1, mtime_ns=1, content_hash="b")
    again = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.b", payload=b"p", deliveries=(_report(1),))
    assert j.complete(reg.input.id, [again]) == [2]
    assert j.outbox_depth()[0] == 1 and j.pending() == []


def test_reopening_keeps_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "data" / "journal.sqlite3"
    j = open_journal(path)
    seqs = [_scored(j, f"f{n}", _report(n)) for n in range(1, 4)]
    first, second, _third = (i.id for i in j.outbox_due(2**62, 10))
    j.outbox_retry([first], 2**40, None, "no connection to the PACS")
    j.outbox_refused(second, 0xA900, "0xA900 Data Set Does Not Match SOP Class")
    j.close()
    j = open_journal(path)
    assert j.delivery_of(seqs[0]) == Delivery(DeliveryState.PENDING, 1, None, "no connection to the PACS", "2.25.1")
    assert j.delivery_of(seqs[1]).state is DeliveryState.REFUSED  # type: ignore[union-attr]
    assert [i.sop_instance_uid for i in j.outbox_due(2**62, 10)] == ["2.25.1", "2.25.3"]
    j.close()


def _zero_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)


def test_recover_keeps_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "data" / "journal.sqlite3"
    j = open_journal(path)
    seqs = [_scored(j, f"f{n}", _report(n, size=5000)) for n in range(1, 5)]  # payloads over several pages
    a, b, c, _d = (i.id for i in j.outbox_due(2**62, 10))
    j.outbox_retry([a], 2**40, None, "no connection to the PACS")
    j.outbox_refused(b, 0xC001, "0xC001 Cannot Understand")
    j.outbox_delivered([c])
    before = [j.delivery_of(s) for s in seqs]
    j.close()
    _zero_header(path)

    lines = recover(path)
    assert any(line.startswith("outbox: 4 DICOM objects for the PACS kept (2 still to send") for line in lines), lines
    j = open_journal(path)
    assert [j.delivery_of(s) for s in seqs] == before
    pending = j.outbox_due(2**62, 10)
    expected = [(f"2.25.{n}", _report(n, 5000).payload) for n in (1, 4)]
    assert [(i.sop_instance_uid, i.payload) for i in pending] == expected
    # New reports continue after the salvaged ones.
    late = _scored(j, "late", _report(99))
    assert j.delivery_of(late) == Delivery(DeliveryState.PENDING, 0, None, "", "2.25.99")
    j.close()


def test_recover_of_a_journal_from_before_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "data" / "journal.sqlite3"
    j = open_journal(path)
    seq = _scored(j, "a")
    j.close()
    with sqlite3.connect(path) as db:  # as a journal written before the outbox existed
        db.execute("DROP TABLE outbox")
    _zero_header(path)
    lines = recover(path)
    assert not any(line.startswith("outbox:") for line in lines), lines
    j = open_journal(path)
    assert j.result_by_seq(seq) is not None
    assert j.outbox_depth() == (0, None)
    assert _scored(j, "b", _report(1)) > seq  # the new journal has the table
    j.close()
