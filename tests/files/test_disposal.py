"""What happens to a file after its result is stored, on a real folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from appliance.config import WatchConfig
from appliance.domain.errors import CorruptImage, FileRewritten
from appliance.domain.manifest import load_manifest
from appliance.domain.result import InputFacts, Rejection, Timings
from appliance.files.disposal import dispose, dispose_rejected, dispose_scored
from appliance.scoring.job import Scorer
from appliance.scoring.results import rejected
from tests.integration.conftest import TEST_MODEL


def _config(tmp_path: Path, after: str) -> WatchConfig:
    return WatchConfig(
        dir=tmp_path / "in",
        after_scoring=after,  # type: ignore[arg-type]
        processed_dir=tmp_path / "done",
        rejected_dir=tmp_path / "bad",
    )


@pytest.mark.parametrize("after", ["keep", "move", "delete"])
def test_after_scoring(tmp_path: Path, after: str) -> None:
    src = tmp_path / "in" / "a.dcm"
    src.parent.mkdir()
    src.write_bytes(b"data")
    where = dispose_scored(src, 7, _config(tmp_path, after))
    if after == "keep":
        assert where == str(src) and src.exists()
    elif after == "move":
        assert where == str(tmp_path / "done" / "00000007-a.dcm") and Path(where).read_bytes() == b"data"
        assert not src.exists()
    else:
        assert where == "" and not src.exists()


def test_rejected_file_gets_a_reason_beside_it(tmp_path: Path) -> None:
    src = tmp_path / "in" / "x.png"
    src.parent.mkdir()
    src.write_bytes(b"junk")
    rejection = Rejection("corrupt_image", "The PNG is cut short.")
    where = Path(dispose_rejected(src, 3, rejection, _config(tmp_path, "keep")))
    assert where.read_bytes() == b"junk" and not src.exists()
    reason = where.with_name(where.name + ".reason.txt").read_text()
    assert "code: corrupt_image" in reason and "The PNG is cut short." in reason


def test_a_file_the_scanner_rewrote_after_it_was_taken_stays_for_its_new_content(tmp_path: Path) -> None:
    scorer = Scorer(load_manifest(TEST_MODEL).manifest, "onnxruntime")
    config = _config(tmp_path, "move")
    for name, error, left in [("new.png", FileRewritten(), True), ("bad.png", CorruptImage(), False)]:
        src = tmp_path / "in" / name
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(b"bytes")
        facts = InputFacts(input_id=5, source="folder", file_name=name, content_hash="h")
        where = dispose(src, 5, "folder", rejected(facts, scorer, error, Timings()), config)
        assert (where == str(src) and src.exists()) is left, (name, where)


def test_a_crash_between_link_and_unlink_is_finished_next_time(tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.dcm"
    src.parent.mkdir()
    src.write_bytes(b"data")
    (tmp_path / "done").mkdir()
    os.link(src, tmp_path / "done" / "00000009-a.dcm")  # what the crashed run had done
    where = dispose_scored(src, 9, _config(tmp_path, "move"))
    assert Path(where).read_bytes() == b"data" and not src.exists()


@pytest.mark.parametrize("after", ["move", "rejected"])
def test_a_file_set_aside_is_private_whatever_mode_its_writer_gave_it(tmp_path: Path, after: str) -> None:
    src = tmp_path / "in" / "scan.dcm"
    src.parent.mkdir()
    src.write_bytes(b"data")
    src.chmod(0o644)  # as a scanner's export often leaves it
    config = _config(tmp_path, "move")
    if after == "move":
        where = Path(dispose_scored(src, 5, config))
        folder = config.processed_dir
    else:
        where = Path(dispose_rejected(src, 5, Rejection("corrupt_dicom", "Cut short."), config))
        folder = config.rejected_dir
        assert where.with_name(where.name + ".reason.txt").stat().st_mode & 0o777 == 0o600
    assert where.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to give a file to another user"
)
def test_a_file_the_appliance_does_not_own_is_moved_as_a_private_copy(tmp_path: Path) -> None:
    """The scanner's file, writable by the appliance through a shared group but not its own: a link could not
    be made private (chmod is the owner's), so the appliance keeps a copy, 0600, and the source goes. Run as
    root without CAP_FOWNER, the power to chmod what it does not own, as the service user is."""
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "scan.dcm"
    src.write_bytes(b"data")
    os.chown(src, 65534, 65534)
    src.chmod(0o666)
    config = _config(tmp_path, "move")
    code = (
        "import sys; from pathlib import Path; from appliance.config import WatchConfig;"
        "from appliance.files.disposal import dispose_scored;"
        "print(dispose_scored(Path(sys.argv[1]), 4, WatchConfig.model_validate_json(sys.argv[2])))"
    )
    without_fowner = ["setpriv", "--bounding-set=-fowner", "--inh-caps=-fowner", "--"]
    done = subprocess.run(
        [*without_fowner, sys.executable, "-c", code, str(src), config.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    where = Path(done.stdout.strip())
    assert where.read_bytes() == b"data" and not src.exists()
    assert where.stat().st_uid == 0 and where.stat().st_mode & 0o777 == 0o600


def test_a_move_to_another_filesystem_is_a_whole_private_copy(tmp_path: Path) -> None:
    """Where the processed folder is on another filesystem (no hard link across), the file is copied: whole, 0600,
    on the disk before the source goes; a partial copy that a crash left there is replaced, not left beside it."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    elsewhere = Path(tempfile.mkdtemp(dir=other))
    try:
        src = tmp_path / "in" / "scan.dcm"
        src.parent.mkdir()
        src.write_bytes(b"data" * 100_000)
        src.chmod(0o644)
        config = WatchConfig(
            dir=src.parent, after_scoring="move", processed_dir=elsewhere / "done", rejected_dir=elsewhere / "bad"
        )
        config.processed_dir.mkdir(mode=0o700)
        (config.processed_dir / ".00000006-scan.dcm.tmp").write_bytes(b"da")  # a crash's partial copy
        where = Path(dispose_scored(src, 6, config))
        assert where == config.processed_dir / "00000006-scan.dcm" and where.read_bytes() == b"data" * 100_000
        assert where.stat().st_mode & 0o777 == 0o600 and not src.exists()
        assert [p.name for p in config.processed_dir.iterdir()] == [where.name]
    finally:
        shutil.rmtree(elsewhere)


def test_a_reason_left_by_an_earlier_try_is_replaced_privately(tmp_path: Path) -> None:
    src = tmp_path / "in" / "x.png"
    src.parent.mkdir()
    src.write_bytes(b"junk")
    config = _config(tmp_path, "keep")
    config.rejected_dir.mkdir()
    earlier = config.rejected_dir / "00000003-x.png.reason.txt"
    earlier.write_text("half a reas")
    earlier.chmod(0o644)
    where = Path(dispose_rejected(src, 3, Rejection("corrupt_image", "The PNG is cut short."), config))
    reason = where.with_name(where.name + ".reason.txt")
    assert reason.read_text() == "input_id: 3\ncode: corrupt_image\nreason: The PNG is cut short.\n"
    assert reason.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in config.rejected_dir.iterdir()) == [where.name, reason.name]
