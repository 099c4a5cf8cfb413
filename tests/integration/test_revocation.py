"""Revoking a terminal's token cuts what it has open, against the real daemon: its result stream and its
reflection stream end UNAUTHENTICATED, and nothing scored after the revocation reaches it."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance.api.certs import make_terminal
from appliance.api.tokens import Scope
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import png_bytes
from tests.integration.test_security import Clinic

ENDS_WITHIN_S = 10.0  # a generous bound on "within a second": the test waits on the stream's end, not a clock


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    c = Clinic(tmp_path_factory.mktemp("revocation"))
    c.daemon.start()
    yield c
    c.daemon.stop()


def _terminal(clinic: Clinic, name: str) -> dict[str, object]:
    token = clinic.tokens.add(name, Scope.read)
    make_terminal(clinic.certs, name)
    return clinic.credentials(name, token=token)


def _revoke(clinic: Clinic, name: str) -> None:
    """With the real CLI, from another process, as IT would."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.app.cli",
            "token",
            "revoke",
            name,
            "--config",
            str(clinic.daemon.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "revoked" in out.stdout, out.stderr


@dataclass
class _Follower:
    """A terminal's StreamResults on a thread of its own: what it got, and how the stream ended."""

    channel: grpc.Channel
    since: int
    got: list[int] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    ended: threading.Event = field(default_factory=threading.Event)
    error: grpc.RpcError | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for r in pb_grpc.ScoringStub(self.channel).StreamResults(
                pb.StreamResultsRequest(since_sequence=self.since)
            ):
                with self.changed:
                    self.got.append(r.sequence)
                    self.changed.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= count, timeout), f"got {len(self.got)}/{count}"


def _drop(clinic: Clinic, seeds: range) -> None:
    for seed in seeds:
        path = clinic.daemon.incoming / f"rev-{seed}.png"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(png_bytes(seed))
        tmp.rename(path)


def test_a_revoked_terminals_stream_is_cut_and_gets_nothing_scored_after(clinic: Clinic) -> None:
    since = clinic.daemon.status().last_sequence
    credentials = _terminal(clinic, "ward-5")
    follower = _Follower(clinic.connect(**credentials), since)
    follower.start()
    _drop(clinic, range(8100, 8103))
    follower.wait_for(3)  # results flow to the terminal

    _revoke(clinic, "ward-5")
    revoked_at = clinic.daemon.status().last_sequence
    _drop(clinic, range(8103, 8106))  # scored after the revocation, for everyone else
    assert follower.ended.wait(ENDS_WITHIN_S), "the revoked terminal's stream is still open"
    assert follower.error is not None and follower.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token was revoked" in (follower.error.details() or "")

    later = [r.sequence for r in clinic.daemon.collect(3, since=revoked_at)]
    assert len(later) == 3 and not set(later) & set(follower.got)
    assert max(follower.got) <= revoked_at
    log = clinic.daemon.log()
    assert log.count("cut StreamResults of terminal 'ward-5': its token was revoked") == 1
    assert str(credentials["token"]) not in log
    follower.channel.close()


def test_a_revoked_terminals_reflection_stream_is_cut(clinic: Clinic) -> None:
    credentials = _terminal(clinic, "ward-6")
    asked = threading.Event()
    done = threading.Event()

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        asked.set()
        done.wait(60)  # the stream stays open, as a reflection client's does between questions

    with clinic.connect(**credentials) as ch:
        answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(requests())
        assert next(answers).list_services_response.service
        assert asked.wait(10)
        _revoke(clinic, "ward-6")
        with pytest.raises(grpc.RpcError) as e:
            next(answers, None)  # blocks until the stream ends
        done.set()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token was revoked" in (e.value.details() or "")
    assert "cut ServerReflectionInfo of terminal 'ward-6': its token was revoked" in clinic.daemon.log()


def test_other_terminals_streams_go_on(clinic: Clinic) -> None:
    since = clinic.daemon.status().last_sequence
    keeps = _Follower(clinic.connect(**clinic.credentials("ward-1")), since)
    keeps.start()
    _terminal(clinic, "ward-7")
    _revoke(clinic, "ward-7")
    _drop(clinic, range(8200, 8202))
    keeps.wait_for(2)
    assert not keeps.ended.is_set()
    keeps.channel.close()
