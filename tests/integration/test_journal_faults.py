"""The real daemon on a damaged journal: exit 2 with one sentence naming the recovery command, no traceback,
no crash loop; after `appliance journal recover` it serves, and a terminal resuming after the old last
sequence receives new results under higher numbers."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.journal.integrity import check as check_journal
from appliance.journal.integrity import open_journal, read_marker
from appliance.journal.journal import Journal

from .conftest import TEST_MODEL, Daemon, drop, free_port, png_bytes

FIRST_RUN = 12  # results in the journal before it is damaged


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One real run (FIRST_RUN files scored, then a clean stop): its data folder, copied by each test."""
    d = Daemon(root=tmp_path_factory.mktemp("first-run"), model=TEST_MODEL)
    try:
        d.start()
        for n in range(FIRST_RUN):
            drop(d.incoming, f"first-{n:02d}.png", png_bytes(7000 + n))
        last = d.collect(FIRST_RUN, timeout=60)[-1].sequence
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
    assert last == FIRST_RUN
    return d.root / "data", last


def _results_pages(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        try:
            return [p for (p,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'results' AND pagetype = 'leaf'")]
        except sqlite3.OperationalError:  # SQLite built without dbstat: the middle of the file
            pages = path.stat().st_size // 4096
            return list(range(pages // 2, pages // 2 + 1))


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _overwrite_middle(path: Path) -> None:
    pages = _results_pages(path)
    page = pages[len(pages) // 2]
    with open(path, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(b"\xa5" * 4096)


def _zero_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)


def _delete(path: Path) -> None:
    path.unlink()


def _swap_in_another(path: Path) -> None:
    other = path.with_name("other.sqlite3")
    j = open_journal(other)
    j.close()
    other.replace(path)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-to-0": (_truncate, "is empty (0 bytes)"),
    "overwritten-middle": (_overwrite_middle, "malformed"),
    "header-zeroed": (_zero_header, "header is damaged"),
    "deleted": (_delete, "is missing"),
    "another-journal": (_swap_in_another, "is another journal"),
}


def _appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.app.cli", *args], capture_output=True, text=True, timeout=90, check=False
    )


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_journal_is_refused_then_recovered(make_daemon, first_run: tuple[Path, int], damage: str) -> None:
    data, last = first_run
    d = make_daemon()
    shutil.copytree(data, d.root / "data", ignore=shutil.ignore_patterns("*.lock", "spool"))
    journal = d.root / "data" / "journal.sqlite3"
    ceiling = read_marker(journal)
    assert ceiling is not None
    hurt, said = DAMAGE[damage]
    hurt(journal)

    d.port = free_port()
    d.incoming.mkdir(parents=True, exist_ok=True)
    d.write_config()
    refused = _appliance("run", "--config", str(d.config_path))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    sentences = [line for line in refused.stderr.splitlines() if line.startswith("appliance: ")]
    assert len(sentences) == 1, refused.stderr[-3000:]
    assert said in sentences[0] and "appliance journal recover" in sentences[0]

    if damage == "header-zeroed":  # once through the CLI (each run costs a second): the same verdict
        check = _appliance("journal", "check", "--config", str(d.config_path))
        assert check.returncode == 2 and check.stdout.strip() == sentences[0], check.stdout
    else:
        assert sentences[0] == f"appliance: {check_journal(journal)}"

    recovered = _appliance("journal", "recover", "--config", str(d.config_path))
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert f"new results continue after #{ceiling.ceiling}" in recovered.stdout, recovered.stdout
    assert list(journal.parent.glob("journal.sqlite3.damaged-*")) or damage == "deleted"
    assert check_journal(journal) is None

    d.start()
    drop(d.incoming, "after-recovery.png", png_bytes(9000))
    new = d.collect(1, since=last, timeout=60)
    assert new[0].file_name == "after-recovery.png" and new[0].sequence > ceiling.ceiling >= last
    assert d.stop() == 0


def test_a_journal_from_before_markers_is_adopted_by_the_daemon(make_daemon, first_run: tuple[Path, int]) -> None:
    data, last = first_run
    d = make_daemon()
    shutil.copytree(data, d.root / "data", ignore=shutil.ignore_patterns("*.lock", "*.marker", "spool"))
    d.start()
    drop(d.incoming, "after-upgrade.png", png_bytes(9100))
    assert d.collect(1, since=last, timeout=60)[0].sequence == last + 1  # no gap: nothing was lost
    assert d.stop() == 0
    marker = read_marker(d.root / "data" / "journal.sqlite3")
    assert marker is not None and marker.floor == last + 1
    j = Journal(d.root / "data" / "journal.sqlite3")
    assert j.identity() == marker.journal_id
    j.close()


def test_a_data_folder_emptied_is_refused_by_the_marker_copy_kept_apart(
    make_daemon, first_run: tuple[Path, int]
) -> None:
    """Journal and marker both gone (they sit in one folder): the copy beside the data folder still names the
    journal, so the daemon refuses to start numbering again at 1 under terminals that resume from #12."""
    data, last = first_run
    d = make_daemon()
    shutil.copytree(data.with_name("data.identity"), d.root / "data.identity")
    (d.root / "data").mkdir()  # the folder is there, its contents are not
    d.port = free_port()
    d.incoming.mkdir(parents=True, exist_ok=True)
    d.write_config()
    refused = _appliance("run", "--config", str(d.config_path))
    assert refused.returncode == 2, refused.stderr[-3000:]
    sentences = [line for line in refused.stderr.splitlines() if line.startswith("appliance: ")]
    assert len(sentences) == 1 and "is missing" in sentences[0], refused.stderr[-3000:]
    assert not (d.root / "data" / "journal.sqlite3").exists()

    recovered = _appliance("journal", "recover", "--config", str(d.config_path))
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    marker = read_marker(d.root / "data" / "journal.sqlite3", d.root / "data.identity")
    assert marker is not None
    d.start()
    drop(d.incoming, "after-loss.png", png_bytes(9200))
    new = d.collect(1, since=last, timeout=60)
    assert new[0].file_name == "after-loss.png" and new[0].sequence > last
    assert d.stop() == 0
