"""Measure (not a test): N terminals and one stalled reader follow a burst of files; prints the other
terminals' lag and the daemon's memory.

    .venv/bin/python -m tests.integration.streams_probe --streams 500 --files 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from grpc import aio

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import TEST_MODEL, Daemon, drop, png_bytes


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _run(d: Daemon, streams: int, files: int) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    channels = [aio.insecure_channel(d.target) for _ in range(16)]
    stubs = [pb_grpc.ScoringStub(ch) for ch in channels]
    calls = [stubs[i % 16].StreamResults(pb.StreamResultsRequest()) for i in range(streams)]
    stalled = stubs[0].StreamResults(pb.StreamResultsRequest())
    for call in [*calls, stalled]:
        await call.initial_metadata()
    base_rss = _rss_mb(pid)
    lags: list[float] = []
    peak = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _rss_mb(pid))

    threading.Thread(target=sample, daemon=True).start()

    async def follow(call: aio.UnaryStreamCall, record: bool) -> int:
        n = 0
        async for r in call:
            if record:
                lags.append(time.time() * 1e3 - r.created_unix_ms)
            n += 1
            if n >= files:
                call.cancel()
                break
        return n

    tasks = [asyncio.create_task(follow(c, i % 25 == 0)) for i, c in enumerate(calls)]
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, lambda: [drop(d.incoming, f"b{i:05d}.png", png_bytes(50_000 + i)) for i in range(files)]
    )
    counts = await asyncio.gather(*tasks)
    took = time.perf_counter() - t0
    stop.set()
    missed = [(await stalled.read()).sequence for _ in range(files)]
    stalled.cancel()
    for ch in channels:
        await ch.close()
    lags.sort()
    print(f"{streams} streams + 1 stalled, {files} files in {took:.1f} s")
    print(f"every stream got every result: {all(c == files for c in counts)}")
    print(f"stalled reader, resumed: {len(missed)} results, in order: {missed == sorted(missed)}")
    print(
        f"lag (result stored -> terminal received), sampled streams: median {statistics.median(lags):.0f} ms, "
        f"p99 {lags[int(len(lags) * 0.99)]:.0f} ms, max {lags[-1]:.0f} ms"
    )
    print(f"daemon RSS: {base_rss:.0f} MB with streams open, peak {peak[0]:.0f} MB during the burst")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--files", type=int, default=2000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(
            root=Path(tmp),
            model=TEST_MODEL,
            overrides={"server": {"max_streams_per_terminal": 10_000}, "watch": {"after_scoring": "delete"}},
        )
        d.start()
        try:
            asyncio.run(_run(d, args.streams, args.files))
        finally:
            d.stop()


if __name__ == "__main__":
    main()
