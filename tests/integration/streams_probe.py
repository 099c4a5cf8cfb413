"""Measure (not a test): N terminals and one stalled reader follow a burst of files; prints the other
terminals' lag and the daemon's memory.

    .venv/bin/python -m tests.integration.streams_probe --streams 500 --files 2000 [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import TEST_MODEL, Daemon, drop, png_bytes

STREAM_METHOD = "/appliance.v1.Scoring/StreamResults"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children that were waited for (the decode workers
    are counted when they exit; the daemon's own threads at once)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


MEASURED = 10  # streams in this process that decode each result and time it; the rest only count bytes


async def _mass(target: str, streams: int, files: int, ready: Connection, done: Connection) -> None:
    """The other terminals, in a process of their own: open, say so, read every result as bytes."""
    channels = [aio.insecure_channel(target) for _ in range(16)]
    calls = [
        channels[i % 16].unary_stream(STREAM_METHOD, request_serializer=_request, response_deserializer=None)(
            pb.StreamResultsRequest()
        )
        for i in range(streams)
    ]
    for call in calls:
        await call.initial_metadata()
    ready.send(True)

    async def count(call: aio.UnaryStreamCall) -> int:
        n = 0
        async for _ in call:
            n += 1
            if n >= files:
                call.cancel()
                break
        return n

    done.send(await asyncio.gather(*(count(c) for c in calls)))
    for ch in channels:
        await ch.close()


def _mass_process(target: str, streams: int, files: int, ready: Connection, done: Connection) -> None:
    asyncio.run(_mass(target, streams, files, ready, done))


async def _run(d: Daemon, streams: int, files: int, rate: float) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    ready_r, ready_w = multiprocessing.Pipe(duplex=False)
    done_r, done_w = multiprocessing.Pipe(duplex=False)
    mass = multiprocessing.get_context("spawn").Process(
        target=_mass_process, args=(d.target, streams - MEASURED, files, ready_w, done_w)
    )
    mass.start()
    channel = aio.insecure_channel(d.target)
    stub = pb_grpc.ScoringStub(channel)
    calls = [stub.StreamResults(pb.StreamResultsRequest()) for _ in range(MEASURED)]
    stalled = stub.StreamResults(pb.StreamResultsRequest())
    for call in [*calls, stalled]:
        await call.initial_metadata()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ready_r.recv)
    base_rss = _rss_mb(pid)
    lags: list[float] = []
    peak = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _rss_mb(pid))

    threading.Thread(target=sample, daemon=True).start()

    async def follow(call: aio.UnaryStreamCall) -> int:
        n = 0
        async for r in call:
            lags.append(time.time() * 1e3 - r.created_unix_ms)
            n += 1
            if n >= files:
                call.cancel()
                break
        return n

    health_ms: list[float] = []

    async def probe_health() -> None:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            t = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(service="appliance.v1.Scoring"), timeout=30)
            health_ms.append((time.perf_counter() - t) * 1e3)
            await asyncio.sleep(0.5)

    prober = asyncio.create_task(probe_health())
    tasks = [asyncio.create_task(follow(c)) for c in calls]
    t0 = time.perf_counter()
    cpu0 = _cpu_s(pid)

    def burst() -> None:
        for i in range(files):
            if rate:  # paced like a scanner's export instead of all at once
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            drop(d.incoming, f"b{i:05d}.png", png_bytes(50_000 + i))

    await loop.run_in_executor(None, burst)
    counts = await asyncio.gather(*tasks)
    took = time.perf_counter() - t0
    daemon_cpu = _cpu_s(pid) - cpu0
    mass_counts = await loop.run_in_executor(None, done_r.recv)
    stop.set()
    await prober
    mass.join()
    missed = [(await stalled.read()).sequence for _ in range(files)]
    stalled.cancel()
    await channel.close()
    lags.sort()
    paced = f" at {rate:g}/s" if rate else ""
    print(
        f"{streams} streams ({streams - MEASURED} in another process) + 1 stalled, {files} files{paced}: {took:.1f} s"
    )
    print(f"every stream got every result: {all(c == files for c in [*counts, *mass_counts])}")
    print(f"stalled reader, resumed after the burst: {len(missed)} results, in order: {missed == sorted(missed)}")
    print(
        f"lag (result stored -> terminal received), {MEASURED} streams: median {statistics.median(lags):.0f} ms, "
        f"p99 {lags[int(len(lags) * 0.99)]:.0f} ms, max {lags[-1]:.0f} ms"
    )
    print(f"daemon process CPU during the burst: {daemon_cpu:.1f} s (main process threads) over {took:.1f} s")
    print(f"health checks during the burst: {len(health_ms)}, all answered, slowest {max(health_ms):.0f} ms")
    print(f"daemon RSS: {base_rss:.0f} MB with the streams open, peak {peak[0]:.0f} MB during the burst")


def _request(r: pb.StreamResultsRequest) -> bytes:
    return r.SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--rate", type=float, default=0.0, help="Files per second (0: as fast as they can be written).")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(
            root=Path(tmp),
            model=TEST_MODEL,
            overrides={"server": {"max_streams_per_terminal": 10_000}, "watch": {"after_scoring": "delete"}},
        )
        d.start()
        try:
            asyncio.run(_run(d, args.streams, args.files, args.rate))
        finally:
            d.stop()


if __name__ == "__main__":
    main()
