"""The processes a test looks at from outside, through /proc: a daemon's (or this process's) decode workers,
and whether a process is still alive."""

from __future__ import annotations

from pathlib import Path

from bench.daemon_run import process_tree


def decode_workers(pid: int) -> set[int]:
    """The decode workers of the process ``pid`` (a daemon, or the test itself): its forkserver's children."""
    tree = process_tree(pid)
    forkservers = {p for p in tree if parent(p) == pid}
    return {p for p in tree if parent(p) in forkservers}


def parent(pid: int) -> int:
    """The parent's pid, -1 once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def alive(pid: int) -> bool:
    """Running or stopped, not gone nor a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
