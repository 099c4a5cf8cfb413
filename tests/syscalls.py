"""A real program's system calls, as strace records them, for tests of what reaches the disk and when: written,
fsynced, renamed, each with the wall-clock times it started and ended (comparable with ``time.time()``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import tool

DISK = "openat,write,fchmod,fsync,fdatasync,rename,renameat,renameat2"  # the calls that put a file on the disk
# strace -ttt -T -y -s 0, one file per thread (-ff): "<start> <call>(<args>) = <result> <seconds taken>", each
# fd shown with its path ("7</data/spool/x>"), no data (-s 0: a payload could hold anything).
_LINE = re.compile(
    r"^(?P<start>\d+\.\d+) (?P<call>\w+)\((?P<args>.*)\) += (?P<result>-?\d+)\S* .*<(?P<took>\d+\.\d+)>$"
)
_FD = re.compile(r"^\d+<(?P<path>.*)>$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    """One completed system call of one thread."""

    call: str
    args: str
    result: int
    start: float  # the wall clock, as time.time()
    end: float

    @property
    def fd_path(self) -> str | None:
        """The path of the fd the call takes first (write, fsync), as strace -y shows it."""
        found = _FD.match(self.args.split(", ")[0])
        return found["path"] if found else None

    @property
    def paths(self) -> list[str]:
        """The paths it names (rename: from, to)."""
        return _QUOTED.findall(self.args)

    @property
    def syncs(self) -> bool:
        return self.call in ("fsync", "fdatasync") and self.result == 0


def strace(traces: Path) -> list[str]:
    """The command that runs what follows it under strace, one trace per thread in ``traces``; the test is
    skipped, with the line that installs it, where strace is missing."""
    found = tool("strace")
    if found is None:
        pytest.skip("strace missing: sudo apt-get install strace")
    traces.mkdir(parents=True, exist_ok=True)
    return [str(found), "-f", "-ff", "-ttt", "-T", "-y", "-s", "0", "-e", f"trace={DISK}", "-o", str(traces / "t")]


def threads(traces: Path) -> list[list[Call]]:
    """Each traced thread's calls, in the order it made them."""
    out = []
    for trace in sorted(traces.iterdir()):
        calls = []
        for line in trace.read_text(errors="replace").splitlines():
            found = _LINE.match(line)
            if found:
                start, took = float(found["start"]), float(found["took"])
                calls.append(Call(found["call"], found["args"], int(found["result"]), start, start + took))
        out.append(calls)
    return out


def in_order(traces: Path) -> list[Call]:
    """Every traced thread's calls in the order they started: for a file written by one thread and put in place
    by another (a C-STORE's data set arrives on the association's reader, its handler keeps it)."""
    return sorted((c for thread in threads(traces) for c in thread), key=lambda c: c.start)


def durable_write(calls: list[Call], folder: str) -> tuple[list[Call], Call, Call, Call]:
    """In a thread's calls (or ``in_order``), the one rename into ``folder`` and what made it durable and private, in
    order: the temporary file made 0600, written, fsynced, the rename, the folder's fsync after it. Fails where any
    is missing or out of order."""
    renames = [i for i, c in enumerate(calls) if c.call.startswith("rename") and c.result == 0]
    into = [i for i in renames if str(Path(calls[i].paths[-1]).parent) == folder]
    assert len(into) == 1, f"one rename into {folder}: {[calls[i] for i in renames]}"
    at = into[0]
    rename = calls[at]
    temporary = rename.paths[0]
    assert str(Path(temporary).parent) == folder, f"{temporary} written away from its place: not an atomic rename"
    before, after = calls[:at], calls[at + 1 :]
    # Its mode as made (a umask can only narrow it) or as set since: 0600, whatever the umask.
    made = [
        c
        for c in before
        if (c.call == "openat" and c.paths == [temporary] and "O_CREAT" in c.args)
        or (c.call == "fchmod" and c.fd_path == temporary)
    ]
    assert made and made[-1].args.endswith(", 0600"), f"{temporary} not made 0600: {made}"
    writes = [c for c in before if c.call == "write" and c.fd_path == temporary]
    synced = [c for c in before if c.syncs and c.fd_path == temporary]
    assert writes and synced, f"{temporary}: written {writes}, fsynced {synced}"
    assert before.index(writes[-1]) < before.index(synced[-1]), f"{temporary} written to after its fsync"
    folder_synced = [c for c in after if c.syncs and c.fd_path == folder]
    assert folder_synced, f"{folder} never fsynced after the rename to {rename.paths[-1]}: the name can be lost"
    assert synced[-1].end <= rename.start and rename.end <= folder_synced[0].start
    return writes, synced[-1], rename, folder_synced[0]
