"""`appliance-client`: a terminal's view of the appliance: watch results live, score a file, look one up."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.results import result_to_dict
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

DEFAULT_TARGET = os.environ.get("APPLIANCE_TARGET", "127.0.0.1:50051")
RECONNECT_S = 2.0


def wait_until_serving(target: str, alive: Callable[[], bool], timeout: float) -> bool:
    """Poll grpc.health.v1 until the Scoring service says SERVING. False at the timeout, or as soon as
    `alive` says the daemon's process is gone."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline and alive():
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="appliance.v1.Scoring"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False


def format_result(r: pb.Result) -> str:
    """One line a person can read at a glance."""
    name = r.file_name + (f" [frame {r.frame_index + 1}/{r.frame_count}]" if r.frame_count > 1 else "")
    if r.outcome == pb.OUTCOME_REJECTED:
        return f"#{r.sequence:<6} REJECTED  {name}: {r.rejection.code}: {r.rejection.message}"
    decision = pb.Decision.Name(r.decision).removeprefix("DECISION_")
    scores = " ".join(f"{s.label}={s.score:.3f}" for s in r.scores)
    return f"#{r.sequence:<6} {decision:<13} {name}: {','.join(r.findings)} ({scores}) {r.timings.total_ms:.0f} ms"


def _emit(r: pb.Result, as_json: bool) -> None:
    print(json.dumps(result_to_dict(r)) if as_json else format_result(r), flush=True)


def stream(stub: pb_grpc.ScoringStub, since: int) -> Iterator[pb.Result]:
    return stub.StreamResults(pb.StreamResultsRequest(since_sequence=since))


def _watch(target: str, since: int, as_json: bool, follow_reconnect: bool, limit: int) -> int:
    """Follow the stream; on a dropped connection resume after the last result seen, so nothing is missed."""
    last = since
    shown = 0
    while True:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            try:
                for r in stream(stub, last):
                    _emit(r, as_json)
                    last = r.sequence
                    shown += 1
                    if limit and shown >= limit:
                        return 0
            except grpc.RpcError as e:
                if not follow_reconnect:
                    print(f"appliance-client: {e.code().name}: {e.details()}", file=sys.stderr)
                    return 1
                print(
                    f"appliance-client: connection lost ({e.code().name}); resuming after #{last}",
                    file=sys.stderr,
                )
        time.sleep(RECONNECT_S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance-client", description=__doc__)
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port of the appliance (env APPLIANCE_TARGET).")
    p.add_argument("--json", action="store_true", help="One JSON object per result instead of a line of text.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="Print every result as it arrives; reconnects and resumes by itself.")
    w.add_argument("--since", type=int, default=None, help="Replay stored results after this sequence first.")
    w.add_argument("--no-reconnect", action="store_true", help="Exit when the connection drops.")
    w.add_argument("--limit", type=int, default=0, help="Exit after this many results (0: never).")
    s = sub.add_parser("score", help="Send one image and print its result.")
    s.add_argument("file", type=Path)
    g = sub.add_parser("get", help="Look a stored result up.")
    key = g.add_mutually_exclusive_group(required=True)
    key.add_argument("--sequence", type=int)
    key.add_argument("--sop-uid")
    sub.add_parser("status", help="Model, backend, queue depth and counts.")
    sub.add_parser("models", help="The model being served.")
    args = p.parse_args(argv)

    try:
        if args.command == "watch":
            since = args.since
            if since is None:  # live only: start from the newest stored result
                with grpc.insecure_channel(args.target) as ch:
                    since = pb_grpc.ScoringStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
            return _watch(args.target, since, args.json, not args.no_reconnect, args.limit)
        with grpc.insecure_channel(args.target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            if args.command == "score":
                data = args.file.read_bytes()
                r = stub.Score(pb.ScoreRequest(image=data, file_name=args.file.name), timeout=180)
                _emit(r, args.json)
                return 0 if r.outcome == pb.OUTCOME_SCORED else 1
            if args.command == "get":
                req = (
                    pb.GetResultRequest(sequence=args.sequence)
                    if args.sequence is not None
                    else pb.GetResultRequest(sop_instance_uid=args.sop_uid)
                )
                _emit(stub.GetResult(req, timeout=10), args.json)
                return 0
            from google.protobuf.json_format import MessageToDict

            msg = (
                stub.GetStatus(pb.GetStatusRequest(), timeout=10)
                if args.command == "status"
                else stub.ListModels(pb.ListModelsRequest(), timeout=10)
            )
            print(
                json.dumps(
                    MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                    indent=2,
                )
            )
            return 0
    except grpc.RpcError as e:
        print(f"appliance-client: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"appliance-client: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
