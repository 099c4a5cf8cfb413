"""Where the daemon's time goes during a burst (`make bench PROFILE=1`): the cores each thread holds, read from
/proc (every thread, Python's or native), named by py-spy, and for the Python threads the functions of ours
they spend it in (py-spy's samples, attributed to the innermost frame in appliance/).

Threads without a Python name in the daemon are native: ONNX Runtime's intra-op pool and gRPC's core. The
decode workers are processes of their own. py-spy needs ptrace rights over the daemon (root, or
kernel.yama.ptrace_scope = 0); without them the per-thread cores are still given, the functions are not. The
sampler costs a few percent of a core: a burst profiled is a little slower than one that is not, so the bench's
figures before and after a change come from runs without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.daemon_run import process_tree

CLK = os.sysconf("SC_CLK_TCK")
# Samples a second: off the 100 Hz of timers, so no thread is always caught at the same point, and few enough
# that the sampler's own CPU (about 17% of a core at 97 Hz on the MR burst here) does not take inference's cores.
RATE = 29
_THREAD = re.compile(r"^thread \((0x[0-9a-fA-F]+|\d+)\)(?::\s*([^;]*))?;(.*) (\d+)$")


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _ticks(pid: int) -> dict[tuple[int, int], tuple[str, int]]:
    """(pid, tid) -> (the thread's comm, its user+system ticks so far), for a process and its descendants."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{p}/task/{tid}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[(p, int(tid))] = (comm, int(fields[11]) + int(fields[12]))
    return out


def _names(pid: int, spy: str) -> dict[int, str]:
    """The daemon's Python threads by native id, as py-spy reads their names."""
    try:
        text = subprocess.run([spy, "dump", "--pid", str(pid), "--json", "--nonblocking"], capture_output=True,
                              text=True, timeout=30, check=True).stdout  # fmt: skip
        return {int(t["os_thread_id"]): str(t["thread_name"]) for t in json.loads(text) if t.get("os_thread_id")}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return {}


def _group(name: str) -> str:
    """One row per stage: numbered pool threads (prepare_0, grpc-score_3) together."""
    return re.sub(r"_\d+$", "", name)


@dataclass
class Profile:
    """Started before the burst, finished after it: ``report`` divides the CPU by thread and function."""

    pid: int
    out: Path
    spy: str | None = field(default_factory=_py_spy)
    _before: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    _record: subprocess.Popen[bytes] | None = None
    _names: dict[int, str] = field(default_factory=dict)
    problem: str = ""

    def start(self) -> None:
        self._before = _ticks(self.pid)
        if self.spy is None:
            self.problem = "py-spy is not installed (pip install py-spy): functions not sampled"
            return
        self._names = _names(self.pid, self.spy)
        self._record = subprocess.Popen(
            [self.spy, "record", "--pid", str(self.pid), "--rate", str(RATE), "--format", "raw", "--threads",
             "--nonblocking", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def finish(self, files: int, wall_s: float) -> dict[str, Any]:
        after = _ticks(self.pid)
        if self.spy is not None:
            self._names.update(_names(self.pid, self.spy))  # threads started during the burst
        functions = self._stop_record()
        cpu: dict[str, float] = defaultdict(float)
        for key, (comm, ticks) in after.items():
            used = ticks - self._before.get(key, (comm, 0))[1]
            if used <= 0:
                continue
            pid, tid = key
            if pid != self.pid:
                name = "decode workers (processes)"
            elif tid == self.pid:
                name = "MainThread"
            else:
                name = _group(self._names.get(tid, "")) or "native: ONNX Runtime pool, gRPC core"
            cpu[name] += used / CLK
        total = sum(cpu.values())
        threads = {
            name: {"cores": seconds / wall_s, "cpu_ms_per_file": seconds * 1e3 / files, "share": seconds / total}
            for name, seconds in sorted(cpu.items(), key=lambda item: -item[1])
        }
        return {"threads": threads, "functions": functions, "cpu_ms_per_file": total * 1e3 / files,
                "cores_busy": total / wall_s, "problem": self.problem}  # fmt: skip

    def _stop_record(self) -> dict[str, list[tuple[str, float]]]:
        """Per thread group, the five functions of ours it was most often found in (share of its samples)."""
        if self._record is None:
            return {}
        self._record.send_signal(2)  # py-spy writes its output on SIGINT
        try:
            _, err = self._record.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._record.kill()
            self._record.communicate()
            err = b""
        if not self.out.exists():
            self.problem = f"py-spy recorded nothing: {err.decode(errors='replace').strip()[-300:]}"
            return {}
        by_thread: dict[str, Counter[str]] = defaultdict(Counter)
        for line in self.out.read_text(errors="replace").splitlines():
            m = _THREAD.match(line)
            if not m:
                continue
            tid = int(m.group(1), 16) if m.group(1).startswith("0x") else int(m.group(1))
            name = _group(self._names.get(tid, m.group(2) or str(tid)))
            frames = m.group(3).split(";")
            ours = [f for f in frames if "appliance/" in f or "(appliance" in f]
            leaf = frames[-1].split(" (")[0] if frames else "?"
            where = ours[-1].split(" (")[0] if ours else leaf
            if ours and ours[-1] != frames[-1]:
                where += f" > {leaf}"
            by_thread[name][where] += int(m.group(4))
        return {
            name: [(where, n / sum(counts.values())) for where, n in counts.most_common(5)]
            for name, counts in by_thread.items()
        }


def text(profile: dict[str, Any]) -> str:
    lines = [f"  where the daemon's CPU went: {profile['cpu_ms_per_file']:.2f} ms a file, "
             f"{profile['cores_busy']:.2f} cores busy"]  # fmt: skip
    for name, t in profile["threads"].items():
        lines.append(f"    {name:<38} {t['cores']:5.2f} cores  {t['cpu_ms_per_file']:7.2f} ms/file  {t['share']:5.1%}")
        for where, share in profile["functions"].get(name, [])[:3]:
            lines.append(f"      {share:5.1%} {where}")
    if profile["problem"]:
        lines.append(f"    ({profile['problem']})")
    return "\n".join(lines)
