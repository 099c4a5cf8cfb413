"""What building while serving costs (`make bench WORKLOAD=build`, inference.build_on_start): the same burst
through a daemon that serves FP32 with no build, and through one that serves FP32 while it builds this host's
quantized artifact in the background; alternated (off, on, off), each on a bare engines folder. Then how long
the build takes to finish once the burst is over, and what it swapped in or why not."""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

from bench.daemon_run import BenchDaemon, cpu_seconds_of, process_tree

BUILD_WAIT_S = 1800.0  # after the burst, how long to wait for the build to end (--build-wait-s)


def _split(daemon: BenchDaemon) -> tuple[list[int], list[int]]:
    """The daemon's processes (itself, its workers) and the background build's (python -m build_engine)."""
    assert daemon.proc is not None
    ours: list[int] = []
    build: list[int] = []
    for pid in process_tree(daemon.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        (build if b"build_engine" in cmdline else ours).append(pid)
    return ours, build


def _burst(
    make: functools.partial[BenchDaemon], root: Path, files: list[Path], build: bool, wait_s: float
) -> dict[str, Any]:
    engines = root / "engines"
    shutil.rmtree(engines, ignore_errors=True)
    engines.mkdir(parents=True)
    daemon = make(root=root / "daemon", engines=engines, build_on_start=build)
    daemon.start()
    try:
        if build:
            status = daemon.status()
            assert "building" in status.engine_build, f"no background build started: {status.engine_build!r}"
        staged = [daemon.stage(path, path.name) for path in files]
        ours, builders = _split(daemon)
        cpu_before, build_before = cpu_seconds_of(ours), cpu_seconds_of(builders)
        first = time.time()
        for path in staged:
            daemon.publish(path)
        daemon.wait_for(len(files))
        wall = max(a.at for a in daemon.arrivals) - first
        ours_after, builders_after = _split(daemon)
        figures: dict[str, Any] = {
            "e2e_files_s": len(files) / wall,
            "daemon_cpu_ms_per_file": (cpu_seconds_of(ours_after) - cpu_before) * 1e3 / len(files),
            "build_cores_during_burst": (cpu_seconds_of(builders_after) - build_before) / wall,
        }
        if build:
            started = time.monotonic()
            while "building" in (sentence := daemon.status().engine_build):
                if time.monotonic() - started > wait_s:
                    sentence = f"still building after {wait_s:.0f} s (the bench stopped waiting)"
                    break
                time.sleep(1.0)
            figures["build_left_s"] = time.monotonic() - started
            figures["build_outcome"] = sentence
            figures["served_after"] = daemon.status().model.precision
        return figures
    finally:
        daemon.stop()


def measure(
    make: functools.partial[BenchDaemon], work: Path, files: list[Path], wait_s: float = BUILD_WAIT_S
) -> dict[str, Any]:
    runs = [("off", False), ("on", True), ("off", False)]
    figures: dict[str, Any] = {}
    for number, (name, build) in enumerate(runs):
        print(f"  burst {number + 1} of {len(runs)}: background build {name} ...", flush=True)
        figures[f"{name}_{number}"] = _burst(make, work / f"run-{number}", files, build, wait_s)
    off = [v["e2e_files_s"] for k, v in figures.items() if k.startswith("off")]
    on = figures["on_1"]
    figures["ratio_e2e_building_to_not"] = on["e2e_files_s"] / (sum(off) / len(off))
    return figures


def text(f: dict[str, Any]) -> str:
    on = f["on_1"]
    offs = [v for k, v in f.items() if k.startswith("off")]
    lines = [
        f"workload build: {f['count']} files, model {f['model']}, {f['cpus']} CPUs; a bare engines folder each run",
        "  end to end, no build       " + "  ".join(f"{o['e2e_files_s']:.2f}" for o in offs) + " files/s",
        f"  end to end, building       {on['e2e_files_s']:.2f} files/s   ratio to no build "
        f"{f['ratio_e2e_building_to_not']:.3f}",
        f"  daemon CPU per file        building {on['daemon_cpu_ms_per_file']:.1f} ms, no build "
        + ", ".join(f"{o['daemon_cpu_ms_per_file']:.1f}" for o in offs)
        + " ms",
        f"  the build's share          {on['build_cores_during_burst']:.3f} cores during the burst (SCHED_IDLE)",
        f"  after the burst            the build ended {on.get('build_left_s', 0):.0f} s later: "
        f"{on.get('build_outcome', '')} (serving {on.get('served_after', '?')})",
    ]
    return "\n".join(lines)
