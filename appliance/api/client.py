"""`appliance-client`: a terminal's view of the appliance: watch results live (images, series or both), list the
series as a radiologist's worklist sorts them, score a file, look one up."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.api.codec import heatmap_from_message, result_to_dict
from appliance.config import is_loopback
from appliance.domain.errors import ApplianceError
from appliance.domain.manifest import Preprocess
from appliance.files.content_hash import digest_bytes
from appliance.imaging.overlay import render, write_png
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

DEFAULT_TARGET = os.environ.get("APPLIANCE_TARGET", "127.0.0.1:50051")
RECONNECT_S = 2.0


@dataclass(frozen=True)
class Connection:
    """Where the appliance is and how this terminal proves who it is."""

    target: str
    ca: Path | None = None  # the clinic's CA: set, the channel is TLS
    cert: Path | None = None  # this terminal's certificate and key, for mutual TLS
    key: Path | None = None
    token: str | None = None

    def channel(self) -> grpc.Channel:
        if self.ca is None:
            if self.cert or self.key:
                raise OSError("--cert and --key need --ca (the CA that signed the appliance's certificate).")
            if self.token and not is_loopback(self.target.rsplit(":", 1)[0]):
                raise OSError(
                    "refusing to send the token in the clear to another machine: pass --ca (the clinic's CA) "
                    "to use TLS."
                )
            channel = grpc.insecure_channel(self.target)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes() if self.key else None,
                certificate_chain=self.cert.read_bytes() if self.cert else None,
            )
            channel = grpc.secure_channel(self.target, creds)
        if self.token:
            return grpc.intercept_channel(channel, _Bearer(self.token))
        return channel


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The token on every call, as 'authorization: Bearer …' (plain metadata, so it works over loopback too)."""

    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def explain(e: grpc.RpcError) -> str:
    """What went wrong, in words a terminal's user can act on."""
    code, details = e.code(), e.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return f"refused: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return (
                "the appliance's certificate is not signed by the CA given (--ca), or does not name the address "
                "dialled (--target); check both with IT."
            )
        if "WRONG_VERSION_NUMBER" in details or ("Ssl handshake failed" in details and "PACKET_LENGTH" in details):
            return "the appliance does not speak TLS on that port; drop --ca or check the port."
        if "CERTIFICATE_REQUIRED" in details or "HANDSHAKE_FAILURE" in details or "certificate" in details.lower():
            return "the appliance wants this terminal's certificate: pass --cert and --key (make certs TERMINAL=...)."
        if "Ssl handshake failed" in details or "SSL" in details:
            return f"the TLS handshake failed: {details}"
        return f"cannot reach the appliance at the target given (it may be down, or speak TLS: pass --ca): {details}"
    return f"{code.name}: {details}"


def wait_until_serving(target: str | Connection, alive: Callable[[], bool], timeout: float) -> bool:
    """Poll grpc.health.v1 until the Scoring service says SERVING. False at the timeout, or as soon as
    `alive` says the daemon's process is gone."""
    deadline = time.monotonic() + timeout
    connection = target if isinstance(target, Connection) else Connection(target)
    with connection.channel() as ch:
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
    """One line a person can read at a glance (a series result's: format_series)."""
    if r.HasField("series"):
        return format_series(r)
    name = r.file_name + (f" [frame {r.frame_index + 1}/{r.frame_count}]" if r.frame_count > 1 else "")
    if r.outcome == pb.OUTCOME_REJECTED:
        return f"#{r.sequence:<6} REJECTED  {name}: {r.rejection.code}: {r.rejection.message}"
    decision = pb.Decision.Name(r.decision).removeprefix("DECISION_")
    scores = " ".join(f"{s.label}={s.score:.3f}" for s in r.scores)
    line = f"#{r.sequence:<6} {decision:<13} {name}: {','.join(r.findings)} ({scores}) {r.timings.total_ms:.0f} ms"
    return line + looked_at(r) + delivery_note(r.delivery)


def format_series(r: pb.Result) -> str:
    """A series result in one line: its decision, its top label and score, its images, its key images (the tail
    of each SOP Instance UID, the frame where not the first, the score) and the result it revises."""
    s = r.series
    decision = pb.Decision.Name(s.decision).removeprefix("DECISION_")
    label, score = top_score(s)
    accession = f" (accession {s.accession_number})" if s.accession_number else ""
    images = f"{s.images_scored} images scored" + (f", {s.images_rejected} rejected" if s.images_rejected else "")
    keys = ", ".join(
        _uid_tail(k.sop_instance_uid) + (f" frame {k.frame_index + 1}" if k.frame_index else "") + f" {k.score:.3f}"
        for k in s.key_images
    )
    line = f"#{r.sequence:<6} {decision:<13} series {s.series_instance_uid}{accession}: {label}={score:.3f}; {images}"
    line += f"; key images {keys}" if keys else ""
    line += f"; revises #{s.revises_sequence}" if s.revises_sequence else ""
    return line + delivery_note(s.delivery)


def top_score(s: pb.SeriesResult) -> tuple[str, float]:
    """The series' top label and its score: its key label (the top finding, else the label nearest to one)."""
    scores = {x.label: x.score for x in s.scores}
    if s.key_label in scores:
        return s.key_label, scores[s.key_label]
    if not scores:
        return s.key_label, 0.0
    label = max(scores, key=lambda name: scores[name])
    return label, scores[label]


def _uid_tail(uid: str, keep: int = 12) -> str:
    """Enough of a UID to tell a series' instances apart on a terminal (they share their leading roots)."""
    return uid if len(uid) <= keep + 2 else ".." + uid[-keep:]


_DECISION_RANK = {pb.DECISION_POSITIVE: 0, pb.DECISION_INDETERMINATE: 1, pb.DECISION_NEGATIVE: 2}


def worklist_order(r: pb.Result) -> tuple[int, float, int]:
    """As a radiologist's worklist sorts series: positive first (then indeterminate, then negative), each by its
    top score, highest first; the newest first between equals."""
    return (_DECISION_RANK.get(r.series.decision, 3), -top_score(r.series)[1], -r.sequence)


def live_series(results: Iterable[pb.Result]) -> list[pb.Result]:
    """The live series results among ``results`` (in sequence order): a revision replaces the result it revises
    (one per study and series), sorted by worklist_order."""
    live: dict[tuple[str, str], pb.Result] = {}
    for r in results:
        if r.HasField("series"):
            live[(r.series.study_instance_uid, r.series.series_instance_uid)] = r
    return sorted(live.values(), key=worklist_order)


def looked_at(r: pb.Result) -> str:
    """Where the model looked, when the result carries a heatmap: its peak in the image's pixels."""
    if not r.HasField("heatmap"):
        return ""
    x, y = heatmap_from_message(r.heatmap).peak
    return f"; looked at ({x:.0f}, {y:.0f}) for {r.heatmap.label}"


def delivery_note(d: pb.Delivery) -> str:
    """Where its DICOM report is, when one goes to the PACS."""
    if d.state == pb.DELIVERY_NONE:
        return ""
    state = pb.DeliveryState.Name(d.state).removeprefix("DELIVERY_").lower()
    if d.state == pb.DELIVERY_REFUSED:
        return f"; PACS report refused (status 0x{d.status:04X}: {d.reason})"
    tries = f" after {d.attempts} tries" if d.attempts > 1 else ""
    return f"; PACS report {state}{tries}"


def _emit(r: pb.Result, as_json: bool) -> None:
    print(json.dumps(result_to_dict(r)) if as_json else format_result(r), flush=True)


def stream(
    stub: pb_grpc.ScoringStub, since: int, kinds: Sequence[pb.ResultKind.ValueType] = (), until: int = 0
) -> Iterator[pb.Result]:
    """Results after ``since`` of ``kinds`` (pb.RESULT_KIND_*; none: image results), followed live, or up to
    ``until`` where set."""
    return stub.StreamResults(pb.StreamResultsRequest(since_sequence=since, kinds=kinds, until_sequence=until))


@dataclass(frozen=True)
class Watch:
    """What `watch` shows and for how long."""

    since: int
    kinds: tuple[pb.ResultKind.ValueType, ...] = ()  # none: image results
    until: int = 0  # stop once past this sequence (0: follow live results)
    as_json: bool = False
    reconnect: bool = True
    limit: int = 0  # stop after this many results (0: never)


def _watch(connection: Connection, watch: Watch) -> int:
    """Follow the stream; on a dropped connection resume after the last result seen, so nothing is missed."""
    last = watch.since
    shown = 0
    while True:
        with connection.channel() as channel:
            stub = pb_grpc.ScoringStub(channel)
            try:
                for r in stream(stub, last, watch.kinds, watch.until):
                    _emit(r, watch.as_json)
                    last = r.sequence
                    shown += 1
                    if watch.limit and shown >= watch.limit:
                        return 0
                if watch.until:  # the stream ended where asked
                    return 0
            except grpc.RpcError as e:
                if not watch.reconnect or e.code() in _FINAL:
                    print(f"appliance-client: {explain(e)}", file=sys.stderr)
                    return 1
                print(
                    f"appliance-client: connection lost ({e.code().name}); resuming after #{last}",
                    file=sys.stderr,
                )
        time.sleep(RECONNECT_S)


_FINAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)  # retrying will not help


def worklist(stub: pb_grpc.ScoringStub, since: int = 0) -> list[pb.Result]:
    """The live series results stored after ``since``, as `worklist` prints them: read up to what is stored now."""
    until = stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    if until <= since:
        return []
    return live_series(stream(stub, since, [pb.RESULT_KIND_SERIES], until))


class Mismatch(Exception):
    """The image given is not the one the result was made from, or lacks its frame."""


def _overlay(stub: pb_grpc.ScoringStub, req: pb.GetResultRequest, image: Path, out: Path) -> int:
    """`overlay`: the stored result's heatmap over the image it was made from, windowed as a radiologist sees
    it (the DICOM file's own VOI window, a PNG or JPEG's full range), as a PNG of the image's own size."""
    r = stub.GetResult(req, timeout=10)
    if r.HasField("series"):
        print(
            f"appliance-client: result #{r.sequence} is a series result: give one of its key images' SOP UIDs "
            "(--sop-uid) and that image.",
            file=sys.stderr,
        )
        return 1
    which = f"result #{r.sequence} ({r.file_name})"
    if r.outcome == pb.OUTCOME_REJECTED:
        print(f"appliance-client: {which} was rejected ({r.rejection.code}), so it has no heatmap.", file=sys.stderr)
        return 1
    if not r.HasField("heatmap"):
        print(
            f"appliance-client: {which} has no heatmap: its model ({r.model_name} {r.model_version}) declares "
            "none, or the appliance has them turned off (inference.heatmaps = false).",
            file=sys.stderr,
        )
        return 1
    data = image.read_bytes()
    try:
        decoded = decode(data, limits=DecodeLimits(), preprocess=Preprocess(), name=image.name)
    except ApplianceError as e:
        print(f"appliance-client: cannot read {image}: {e.message}", file=sys.stderr)
        return 1
    try:
        frame = _matching_frame(r, decoded, digest_bytes(data))
    except Mismatch as e:
        print(f"appliance-client: {image} {e}", file=sys.stderr)
        return 1
    heatmap = heatmap_from_message(r.heatmap)
    write_png(out, render(frame, heatmap))
    x, y = heatmap.peak
    frame_note = f" frame {r.frame_index + 1}/{r.frame_count}" if r.frame_count > 1 else ""
    print(f"wrote {out}: {image.name}{frame_note}, looked at ({x:.0f}, {y:.0f}) for {heatmap.label}")
    return 0


def _matching_frame(r: pb.Result, image: DecodedImage, content_hash: str) -> np.ndarray:
    """The result's frame of the image, once the image is known to be the one scored: the same bytes, or
    (re-encoded by the PACS, say) the same DICOM instance; and of a size the heatmap's extent fits."""
    if content_hash != r.content_hash:
        sop = image.meta.sop_instance_uid
        if not (sop and sop == r.sop_instance_uid):
            raise Mismatch(
                f"is not the image result #{r.sequence} was made from: its content differs"
                + (", and so does its SOP Instance UID" if r.sop_instance_uid else "")
                + ". Pass the file that was scored."
            )
    if r.frame_index >= len(image.frames) or len(image.frames) != max(r.frame_count, 1):
        raise Mismatch(
            f"has {len(image.frames)} frame(s); result #{r.sequence} is frame {r.frame_index + 1} of {r.frame_count}."
        )
    rows, cols = image.frames[r.frame_index].shape[:2]
    e, h = r.heatmap.extent, r.heatmap
    # The grid covers the image, centred, to within one of its cells (the model's letterbox rounds to a pixel).
    cell_x, cell_y = (e.x1 - e.x0) / h.width, (e.y1 - e.y0) / h.height
    fits = (
        e.x0 <= cell_x
        and e.y0 <= cell_y
        and e.x1 >= cols - cell_x
        and e.y1 >= rows - cell_y
        and abs(e.x0 + e.x1 - cols) <= cell_x
        and abs(e.y0 + e.y1 - rows) <= cell_y
    )
    if not fits:
        raise Mismatch(
            f"is {cols} x {rows} pixels; result #{r.sequence}'s heatmap covers ({e.x0:.0f}, {e.y0:.0f}) to "
            f"({e.x1:.0f}, {e.y1:.0f}), so it is not the image that was scored."
        )
    return image.frames[r.frame_index]


def _kinds(series: bool, images: bool) -> tuple[pb.ResultKind.ValueType, ...]:
    """What `watch` asks for: image results unless --series; both with --series --images."""
    if not series:
        return ()
    return (pb.RESULT_KIND_SERIES, pb.RESULT_KIND_IMAGE) if images else (pb.RESULT_KIND_SERIES,)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="appliance-client", description=__doc__)
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port of the appliance (env APPLIANCE_TARGET).")
    p.add_argument("--ca", default=env("APPLIANCE_CA"), help="The clinic's CA certificate: use TLS (APPLIANCE_CA).")
    p.add_argument("--cert", default=env("APPLIANCE_CERT"), help="This terminal's certificate (APPLIANCE_CERT).")
    p.add_argument("--key", default=env("APPLIANCE_KEY"), help="This terminal's private key (APPLIANCE_KEY).")
    p.add_argument("--token", default=env("APPLIANCE_TOKEN"), help="This terminal's token (APPLIANCE_TOKEN).")
    p.add_argument("--json", action="store_true", help="One JSON object per result instead of a line of text.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="Print every result as it arrives; reconnects and resumes by itself.")
    w.add_argument("--since", type=int, default=None, help="Replay stored results after this sequence first.")
    w.add_argument("--no-reconnect", action="store_true", help="Exit when the connection drops.")
    w.add_argument("--limit", type=int, default=0, help="Exit after this many results (0: never).")
    w.add_argument("--series", action="store_true", help="Series results: one line per series (see --images).")
    w.add_argument("--images", action="store_true", help="Image results too, with --series (alone: the default).")
    w.add_argument("--no-follow", action="store_true", help="Exit once the results stored now are shown.")
    wl = sub.add_parser(
        "worklist",
        help="The series results standing now (a revision replaces the one it revises), positive first, then by "
        "top score.",
    )
    wl.add_argument("--since", type=int, default=0, help="Only series results stored after this sequence.")
    s = sub.add_parser("score", help="Send one image and print its result.")
    s.add_argument("file", type=Path)
    g = sub.add_parser("get", help="Look a stored result up.")
    key = g.add_mutually_exclusive_group(required=True)
    key.add_argument("--sequence", type=int)
    key.add_argument("--sop-uid", "--sop-instance-uid", dest="sop_uid")
    key.add_argument("--series-uid", "--series-instance-uid", dest="series_uid", help="The series' live result.")
    o = sub.add_parser(
        "overlay",
        help="Write a PNG of where the model looked for a stored result, over the image it was made from.",
        description="Fetch a stored result and draw its heatmap (turbo colour map) over the image it was made from, "
        "windowed as a radiologist sees it (a DICOM file's own VOI window, a PNG or JPEG's full range), at the "
        "image's own size. The image must be the one scored: the same bytes, or the same DICOM instance.",
    )
    okey = o.add_mutually_exclusive_group(required=True)
    okey.add_argument("--sequence", type=int)
    okey.add_argument("--sop-uid", "--sop-instance-uid", dest="sop_uid")
    o.add_argument("--image", type=Path, required=True, help="The image the result is for (DICOM, PNG, JPEG, TIFF).")
    o.add_argument("-o", "--output", type=Path, required=True, help="The PNG to write.")
    sub.add_parser("status", help="Model, backend, queue depth, open series and counts.")
    sub.add_parser("models", help="The model being served.")
    sub.add_parser("reload", help="Load the configured model again and swap it in (needs an admin token).")
    args = p.parse_args(argv)
    connection = Connection(args.target, _path(args.ca), _path(args.cert), _path(args.key), args.token)

    try:
        if args.command == "watch":
            since, until = args.since, 0
            if since is None or args.no_follow:
                with connection.channel() as ch:
                    last = pb_grpc.ScoringStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
                since = last if since is None else since  # live only: start from the newest stored result
                until = last if args.no_follow else 0
                if args.no_follow and until <= since:
                    return 0
            kinds = _kinds(args.series, args.images)
            return _watch(connection, Watch(since, kinds, until, args.json, not args.no_reconnect, args.limit))
        with connection.channel() as channel:
            stub = pb_grpc.ScoringStub(channel)
            if args.command == "worklist":
                for r in worklist(stub, args.since):
                    _emit(r, args.json)
                return 0
            if args.command == "score":
                data = args.file.read_bytes()
                r = stub.Score(pb.ScoreRequest(image=data, file_name=args.file.name), timeout=180)
                _emit(r, args.json)
                return 0 if r.outcome == pb.OUTCOME_SCORED else 1
            if args.command in ("get", "overlay"):
                if args.sequence is not None:
                    req = pb.GetResultRequest(sequence=args.sequence)
                elif getattr(args, "series_uid", None):
                    req = pb.GetResultRequest(series_instance_uid=args.series_uid)
                else:
                    req = pb.GetResultRequest(sop_instance_uid=args.sop_uid)
                if args.command == "overlay":
                    return _overlay(stub, req, args.image, args.output)
                _emit(stub.GetResult(req, timeout=10), args.json)
                return 0
            from google.protobuf.json_format import MessageToDict

            if args.command == "reload":
                answer = stub.ReloadModel(pb.ReloadModelRequest(), timeout=600)
                print(answer.message)
                return 0 if answer.reloaded else 1
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
        print(f"appliance-client: {explain(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"appliance-client: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
