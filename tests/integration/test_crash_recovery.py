"""SIGKILL in the middle of a burst: after a restart every file is scored exactly once and the stream has no gap."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter

from appliance.v1 import scoring_pb2 as pb

from .conftest import drop, png_bytes

BURST = 60


def test_kill_9_mid_burst_then_restart_scores_each_file_exactly_once(make_daemon) -> None:
    # Small batches and one slow-ish worker pool so the kill lands with work in every stage.
    d = make_daemon(inference={"threads": 1, "decode_workers": 1, "max_delay_ms": 2})
    d.start()
    names = [f"burst-{n:03d}.png" for n in range(BURST)]
    for n, name in enumerate(names):
        drop(d.incoming, name, png_bytes(1000 + n, size=256))
    seen_before = d.collect(5, timeout=60)
    d.kill()
    assert len(seen_before) == 5

    d.start()
    results = d.collect(BURST, timeout=120)
    counts = Counter(r.file_name for r in results)
    assert set(counts) == set(names), sorted(set(names) - set(counts))
    assert max(counts.values()) == 1, [n for n, c in counts.items() if c > 1]
    assert [r.sequence for r in results] == list(range(1, BURST + 1))  # gap-free
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results)
    # What was streamed before the kill is still there, unchanged.
    assert [r.SerializeToString() for r in results[:5]] == [r.SerializeToString() for r in seen_before]
    # Nothing more trickles in, and the journal agrees: one result per input, none left queued.
    time.sleep(1.0)
    status = d.status()
    assert (status.last_sequence, status.queue_depth, status.scored) == (BURST, 0, BURST)
    d.stop()
    with sqlite3.connect(d.root / "data" / "journal.sqlite3") as db:
        per_input = db.execute("SELECT input_id, COUNT(*) FROM results GROUP BY input_id").fetchall()
        states = dict(db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state").fetchall())
    assert len(per_input) == BURST and all(c == 1 for _, c in per_input)
    assert states == {"scored": BURST}
