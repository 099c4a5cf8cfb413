"""The real daemon with inference.backend = "triton" against the real Triton (tests/peers/triton.py), serving what
`make engine TARGET=triton` exported: a kill -9 of the server mid-burst loses and doubles no result (the local artifact
scores while it is gone, said in GetStatus.problems, and the server scores again once it is back), and two appliances'
requests are merged into one batch by the server's dynamic batching."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.api.client import stream
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from build_engine import triton_repo
from tests.integration.conftest import TEST_MODEL, Daemon, drop, png_bytes
from tests.peers.triton import Triton, needs_triton
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, needs_triton]

NAME = "pipeline-test"
MAX_BATCH = 4
SIZE = 64  # pipeline-test's input: images need no resizing
FALLBACK = "Inference runs on this host's onnxruntime artifact, not the inference servers"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> triton_repo.Exported:
    """The repository and the engines record, as `make engine TARGET=triton REPO=dir` writes them (FP32, max batch
    4, Triton's queue delay the appliance's max_delay_ms: 5 ms)."""
    root = tmp_path_factory.mktemp("triton-export")
    options = triton_repo.ExportOptions(
        model_dir=TEST_MODEL, engines_dir=root / "engines", repo=root / "repo", precision="fp32", max_batch=MAX_BATCH
    )
    return triton_repo.export(options, out=lambda line: None)


@pytest.fixture(scope="module")
def triton(exported: triton_repo.Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    with Triton(exported.folder.parent, [NAME], root=tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture
def server(triton: Triton) -> Triton:
    """The module's server, running (a test that kills it starts it again, unless it failed first)."""
    if not triton.running:
        triton.start()
    return triton


@pytest.fixture
def appliances(exported: triton_repo.Exported, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Makes daemons (each in its own folder under tmp_path) serving the export on ``server``; kills them after."""
    made: list[Daemon] = []

    def make(name: str, server: Triton, **inference: object) -> Daemon:
        root = tmp_path / name
        engines = root / "engines"
        shutil.copytree(exported.engines_sidecar.parent.parent, engines)
        triton = {"endpoints": [server.grpc_address], "check_timeout_s": 5}
        sections: dict[str, dict[str, object]] = {
            "model": {"engines_dir": engines},
            "inference": {"backend": "triton", "triton": triton, **inference},
        }
        made.append(Daemon(root=root, model=TEST_MODEL, overrides=sections))
        return made[-1]

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


def _burst(d: Daemon, prefix: str, seeds: range) -> list[str]:
    """Images dropped into the watch folder at once (each unique, so each a new input); their file names."""
    names = [f"{prefix}-{seed:03}.png" for seed in seeds]
    for name, seed in zip(names, seeds, strict=True):
        drop(d.incoming, name, png_bytes(seed, size=SIZE))
    return names


def _all_scored(d: Daemon, count: int) -> list[pb.Result]:
    """Every result stored once ``count`` inputs are done and none waits: the stream read up to last_sequence."""
    status = eventually(
        d.status,
        f"{count} inputs done",
        until=lambda s: s.scored + s.rejected + s.duplicates >= count and s.queue_depth == 0,
        timeout=60,
        context=lambda: d.log()[-4000:],
    )
    assert (status.scored, status.rejected, status.duplicates) == (count, 0, 0)
    with d.channel() as channel:
        return list(stream(pb_grpc.ScoringStub(channel), 0, (), status.last_sequence))


def _fallback(d: Daemon) -> list[str]:
    return [p for p in d.status().problems if p.startswith(FALLBACK)]


def test_kill_9_of_the_server_mid_burst_loses_and_doubles_nothing(
    appliances: Callable[..., Daemon], server: Triton
) -> None:
    """A burst is being scored on the server when it is killed: what was under way and what comes meanwhile is
    scored by this host's FP32 model, said in GetStatus.problems while the daemon stays ready; once the server is
    started again the problem ends and new inputs are scored on it. Every input has exactly one result."""
    d = appliances("appliance", server)
    d.start()
    status = d.status()
    assert status.backend == "triton" and not status.problems

    during = _burst(d, "during", range(0, 40))
    (first,) = d.collect(1)
    assert first.backend == "triton"
    server.kill()
    meanwhile = _burst(d, "meanwhile", range(100, 110))
    held = eventually(lambda: _fallback(d), "the fallback in GetStatus.problems", context=lambda: d.log()[-4000:])
    assert server.grpc_address in held[0]
    assert d.status().ready  # a degradation: the appliance serves on
    scored = len(during) + len(meanwhile)
    eventually(
        lambda: d.status().scored >= scored, f"the {scored} inputs so far scored", context=lambda: d.log()[-4000:]
    )
    assert _fallback(d)

    server.start()
    eventually(lambda: not _fallback(d), "the fallback over", timeout=60, context=lambda: d.log()[-4000:])
    after = _burst(d, "after", range(200, 210))

    sent = during + meanwhile + after
    results = _all_scored(d, len(sent))
    by_name = Counter(r.file_name for r in results)
    lost = [name for name in sent if by_name[name] == 0]
    doubled = [name for name, n in by_name.items() if n > 1]
    backend = {r.file_name: r.backend for r in results}
    local = [name for name in sent if backend.get(name) == "onnxruntime"]
    print(
        f"kill -9 mid-burst: {len(sent)} inputs, {len(lost)} lost, {len(doubled)} doubled, {len(local)} scored "
        f"locally ({sum(n in local for n in during)} of the burst under way, {sum(n in local for n in meanwhile)} "
        f"sent meanwhile), {sum(backend.get(n) == 'triton' for n in sent)} on the server"
    )
    assert not lost and not doubled and len(results) == len(sent)
    assert len({r.content_hash for r in results}) == len(sent)
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results)
    assert set(backend.values()) == {"triton", "onnxruntime"}
    assert all(backend[name] == "onnxruntime" for name in meanwhile)
    assert all(backend[name] == "triton" for name in after)


def test_two_appliances_requests_are_batched_together_on_the_server(
    appliances: Callable[..., Daemon], server: Triton
) -> None:
    """Two daemons (two processes) at once against one server with a 5 ms queue delay. Each sends one image a
    request (inference.max_batch = 1) and has one call under way at a time (one batcher thread), so a batch of 2 on
    the server holds a request of each."""
    daemons = [appliances(name, server, max_batch=1) for name in ("east", "west")]
    for d in daemons:
        d.start(wait=False)
    for d in daemons:
        d.wait_ready()
    before = len(server.batch_sizes())
    count = 16
    for seed in range(count):  # both folders filled at once
        for i, d in enumerate(daemons):
            drop(d.incoming, f"{d.root.name}-{seed:03}.png", png_bytes(1000 * i + seed, size=SIZE))
    for d in daemons:
        results = _all_scored(d, count)
        assert {r.backend for r in results} == {"triton"} and all(r.timings.batch_size == 1 for r in results)
    sizes = eventually(
        lambda: server.batch_sizes()[before:],
        "every row in the server's logged batches",
        until=lambda sizes: sum(sizes) >= 2 * count,
    )
    print(f"two appliances, {2 * count} images: the server ran {len(sizes)} batches of {Counter(sizes)} rows")
    assert sum(sizes) == 2 * count
    assert max(sizes) == 2  # merged: one request of each appliance
