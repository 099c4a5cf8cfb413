"""Revocation cuts a unary call in flight too, in-process: the real server, token check and scoring core, with
a real client; only the daemon's status callback is stood in for, to hold the call open while the token is
revoked (a Score waiting on its result takes that path; its scoring is too quick to catch in the act)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc

from appliance.api.grpc_server import GrpcServer
from appliance.api.revocation import OpenCalls
from appliance.api.service import Hooks, ScoringService
from appliance.api.tokens import Scope, TokenStore
from appliance.config import ServerConfig
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.in_process import scoring_core


def test_a_call_in_flight_for_a_revoked_token_gets_unauthenticated_not_its_answer(tmp_path: Path) -> None:
    tokens = TokenStore(tmp_path / "data" / "tokens.json")
    token = tokens.add("ward-9", Scope.read)
    entered, release = threading.Event(), threading.Event()

    def status() -> pb.Status:
        entered.set()
        release.wait(60)
        return pb.Status(ready=True)

    with scoring_core(tmp_path) as core:
        server_config = ServerConfig(port=0, require_token=True, tokens_file=tokens.path)
        hooks = Hooks(
            model_info=pb.ModelInfo,
            status=status,
            problem=lambda: None,
            reload=lambda: pb.ReloadModelResponse(reloaded=False, message="not in this test"),
        )
        service = ScoringService(core.journal, core.intake, tmp_path / "spool", hooks, core.metrics, server_config)
        server = GrpcServer(service, server_config)
        server.start()
        answer: dict[str, grpc.RpcError | pb.Status] = {}
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.ScoringStub(ch)

                def call() -> None:
                    try:
                        answer["got"] = stub.GetStatus(
                            pb.GetStatusRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=60
                        )
                    except grpc.RpcError as e:
                        answer["got"] = e

                caller = threading.Thread(target=call)
                caller.start()
                assert entered.wait(30)
                TokenStore(tokens.path).revoke("ward-9")  # another process's view of the file, as the CLI's
                caller.join(10)
                assert not caller.is_alive(), "the call of a revoked token is still open"
        finally:
            release.set()
            server.stop(grace=1.0)
    got = answer["got"]
    assert isinstance(got, grpc.RpcError) and got.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token was revoked" in (got.details() or "")


def test_a_call_that_registers_after_the_sweep_that_followed_its_revocation_is_cut(tmp_path: Path) -> None:
    """The window between the interceptor's look-up and the call's registration: the sweep that followed the
    revocation found no call to cut, and the tokens file has not changed since."""
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.add("ward-5", Scope.read)
    record = tokens.lookup(token)  # the interceptor's look-up: still live
    assert record is not None
    calls = OpenCalls(tokens)
    TokenStore(tokens.path).revoke("ward-5")  # another process, as the CLI
    calls.check()  # the watch's sweep: nothing open for ward-5 yet

    async def a_stream() -> tuple[bool, bool]:
        with calls.open("/appliance.v1.Scoring/StreamResults", record) as call:
            return call.revoked, calls.fresh(call)

    assert asyncio.run(a_stream()) == (True, False)
