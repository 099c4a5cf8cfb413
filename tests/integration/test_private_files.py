"""Files with patient data are the appliance's user's alone: 0600 in 0700 folders, whatever the way in (the
scanner's folder, where the scanner left its files 0644; Score; the journal), under the real daemon."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

from .conftest import TEST_MODEL, Daemon, drop, png_bytes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_the_daemon_keeps_is_0600_in_a_0700_folder(make_daemon) -> None:
    d: Daemon = make_daemon(model=TEST_MODEL, watch={"after_scoring": "move"})
    # An older version's folders, or an installer's, left open to everyone: closed at start.
    for folder in (d.processed, d.rejected, d.root / "data"):
        folder.mkdir(parents=True, mode=0o755)
        folder.chmod(0o755)
    old_umask = os.umask(0o022)  # the scanner's export: files 0644
    try:
        d.start()
        drop(d.incoming, "scan.png", png_bytes(31))
        drop(d.incoming, "broken.png", png_bytes(32)[:40])
    finally:
        os.umask(old_umask)
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        bad = stub.Score(pb.ScoreRequest(image=b"\x89PNG\r\n\x1a\n cut", file_name="s.png"), timeout=60)
    assert bad.rejection.code == "corrupt_image"
    results = {r.file_name: r for r in d.collect(3, timeout=60)}
    assert results["scan.png"].outcome == pb.OUTCOME_SCORED
    assert results["broken.png"].rejection.code == "corrupt_image"
    assert d.stop() == 0

    kept = [p for p in (d.processed.rglob("*")) if p.is_file()] + [p for p in d.rejected.rglob("*") if p.is_file()]
    names = {p.name for p in kept}
    assert any(n.endswith("-scan.png") for n in names) and any(n.endswith("-broken.png") for n in names)
    assert any(n.endswith(".bin") for n in names), names  # the Score upload's spooled copy, set aside
    assert sum(n.endswith(".reason.txt") for n in names) == 2
    data = [p for p in (d.root / "data").rglob("*") if p.is_file()]
    identity = [p for p in (d.root / "data.identity").rglob("*") if p.is_file()]
    assert any(p.name == "journal.sqlite3" for p in data) and identity
    for path in kept + data + identity:
        assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
    for folder in (d.processed, d.rejected, d.root / "data", d.root / "data" / "spool", d.root / "data.identity"):
        assert _mode(folder) == 0o700, f"{folder} is {oct(_mode(folder))}"
