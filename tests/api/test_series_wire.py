"""Series results on the wire: the codec's round trip, and the real gRPC service over a real journal holding image and
series results in one numbering: StreamResults by kind (resumed, bounded), GetResult by series UID (the live
revision), GetStatus's open series, and appliance-client's series line and worklist."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from appliance.api import client
from appliance.api.codec import encoded_stored, series_from_message, series_message
from appliance.api.grpc_server import GrpcServer
from appliance.api.metrics import Metrics
from appliance.api.service import Hooks, ScoringService
from appliance.config import ServerConfig
from appliance.domain.delivery import Delivery, DeliveryState
from appliance.domain.result import Decision, ImageIds, LabelScore, ScoredBy
from appliance.domain.series import Completion, KeyImage, SeriesResult
from appliance.journal import payload
from appliance.journal.journal import Journal, NewResult, SeriesEntry
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.in_process import scoring_core
from tests.journal.test_payload import REJECTED, SCORED
from tests.waiting import eventually

STUDY = "1.2.826.0.1.3680043.8.498.1"
# Scores a float32 holds exactly: the wire's floats give them back as they were.
SERIES = SeriesResult(
    study_instance_uid=STUDY,
    series_instance_uid=STUDY + ".2",
    accession_number="ACC-7",
    images_scored=40,
    images_rejected=2,
    scores=(LabelScore("glioma", 0.875), LabelScore("notumor", 0.125)),
    decision=Decision.POSITIVE,
    findings=("glioma",),
    threshold=0.5,
    key_label="glioma",
    key_images=(KeyImage(STUDY + ".2.17", 0, 0.875, 21), KeyImage(STUDY + ".2.18", 2, 0.75, 22)),
    scored_by=ScoredBy("pipeline-test", "1.0.0", "onnxruntime"),
    combine="max",
    completion=Completion.HEADER,
    revision=2,
    created_unix_ms=1_790_000_000_500,
    first_image_unix_ms=1_790_000_000_000,
    last_image_unix_ms=1_790_000_000_400,
    revises_sequence=30,
    report_uid="2.25.1",
    revises_report_uid="2.25.0",
    sequence=44,
)


def test_a_series_result_goes_on_the_wire_and_back_as_it_was() -> None:
    message = pb.Result.FromString(series_message(SERIES).SerializeToString())
    assert message.sequence == 44 and message.HasField("series")
    # The image fields stay empty: a terminal tells the kinds apart by the series field alone.
    assert message.outcome == pb.OUTCOME_UNSPECIFIED and not message.sop_instance_uid and not message.scores
    assert series_from_message(message) == SERIES
    assert message.series.completion == pb.COMPLETION_HEADER and message.series.decision == pb.DECISION_POSITIVE
    assert not message.series.HasField("delivery")


def test_a_series_result_looked_up_carries_where_its_report_stands() -> None:
    delivery = Delivery(DeliveryState.REFUSED, 3, 0xA700, "Out of resources", "2.25.1")
    s = series_message(SERIES, delivery).series
    assert (s.delivery.state, s.delivery.attempts, s.delivery.status) == (pb.DELIVERY_REFUSED, 3, 0xA700)
    assert s.delivery.report_sop_instance_uid == s.report_sop_instance_uid == "2.25.1"


def test_an_image_result_is_not_read_as_a_series_result() -> None:
    with pytest.raises(ValueError, match="not a series result"):
        series_from_message(pb.Result(sequence=3, outcome=pb.OUTCOME_SCORED))


def test_the_series_observer_counts_by_decision_and_counts_revisions() -> None:
    metrics = Metrics()
    metrics.on_series("positive", 1)
    metrics.on_series("positive", 2)
    metrics.on_series("negative", 1)
    value = metrics.registry.get_sample_value
    assert value("appliance_series_results_total", {"decision": "positive"}) == 2.0
    assert value("appliance_series_results_total", {"decision": "negative"}) == 1.0
    assert value("appliance_series_revisions_total") == 1.0


# --- the service over a journal holding both kinds --------------------------------------------------------------


def _image(journal: Journal, series_uid: str | None, sop: str) -> int:
    """A DICOM image's scored result, stored in its series (due at once: no quiet period), or an upload's rejection
    (``series_uid`` None: no series); its sequence."""
    registered = journal.register(
        source="dicom" if series_uid else "grpc",
        path=None,
        file_name=f"{sop}.dcm",
        size=1,
        mtime_ns=0,
        content_hash=os.urandom(32).hex(),
    )
    if series_uid is None:
        row = NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=payload.encode(REJECTED))
    else:
        image = dataclasses.replace(SCORED, ids=ImageIds(STUDY, series_uid, sop, "ACC-7"), frame_index=0)
        entry = SeriesEntry(STUDY, series_uid, "ACC-7", stable_ms=0, scores={"glioma": 0.5, "notumor": 0.5})
        row = NewResult(frame_index=0, outcome="scored", sop_uid=sop, payload=payload.encode(image), series=entry)
    (seqs,) = journal.complete_many([(registered.input.id, [row])])
    return seqs[0]


def _series_result(journal: Journal, series_uid: str, decision: Decision, glioma: float) -> int:
    """The series' result (the next revision where it has one), stored as the assembler stores it; its sequence."""
    states = [journal.series_state(i) for i in journal.series_due(2**62)]
    (state,) = [s for s in states if s is not None and s.series_uid == series_uid]
    live = state.live.series() if state.live is not None else None
    result = dataclasses.replace(
        SERIES,
        series_instance_uid=series_uid,
        images_scored=state.scored,
        images_rejected=state.rejected,
        scores=(LabelScore("glioma", glioma), LabelScore("notumor", 1 - glioma)),
        decision=decision,
        findings=("glioma",) if decision is Decision.POSITIVE else ("notumor",),
        key_images=(KeyImage(f"{series_uid}.1", 0, glioma, 1),),
        revision=state.revision + 1,
        revises_sequence=live.sequence if live else 0,
        report_uid="",
        revises_report_uid="",
        sequence=0,
    )
    seq = journal.complete_series(state, payload.encode_series(result))
    assert seq is not None
    return seq


@dataclass
class Stored:
    images: list[int]
    series: dict[str, int]  # what each result is: "A1" the first result of series A, "A2" its revision


A, B, C, D = (f"{STUDY}.{n}" for n in (10, 20, 30, 40))


def _store_first_half(journal: Journal) -> Stored:
    images = [_image(journal, A, f"{A}.1"), _image(journal, None, "upload"), _image(journal, B, f"{B}.1")]
    series = {"A1": _series_result(journal, A, Decision.POSITIVE, 0.75)}
    series["B1"] = _series_result(journal, B, Decision.NEGATIVE, 0.25)
    return Stored(images, series)


def _store_second_half(journal: Journal, stored: Stored) -> None:
    """Stored while the service runs: a late image re-opens A and A's revision follows; D is positive but less so;
    C stays open."""
    stored.images.append(_image(journal, A, f"{A}.2"))
    stored.series["A2"] = _series_result(journal, A, Decision.POSITIVE, 0.875)
    stored.images.append(_image(journal, D, f"{D}.1"))
    stored.series["D1"] = _series_result(journal, D, Decision.POSITIVE, 0.625)
    stored.images.append(_image(journal, C, f"{C}.1"))


@dataclass
class Serving:
    stub: pb_grpc.ScoringStub
    target: str
    stored: Stored
    metrics: Metrics
    journal: Journal


@contextmanager
def _serving(tmp_path: Path) -> Iterator[Serving]:
    """The real service over a journal with results stored before it started (read from the journal) and after (from
    the feed's window)."""
    with scoring_core(tmp_path) as core:
        stored = _store_first_half(core.journal)
        config = ServerConfig(port=0, tokens_file=tmp_path / "data" / "tokens.json")
        hooks = Hooks(
            model_info=lambda: pb.ModelInfo(name="pipeline-test"),
            status=lambda: pb.Status(last_sequence=core.journal.last_sequence()),
            problem=lambda: None,
            reload=lambda: pb.ReloadModelResponse(reloaded=False, message="not in this test"),
        )
        service = ScoringService(core.journal, core.intake, tmp_path / "data" / "spool", hooks, core.metrics, config)
        server = GrpcServer(service, config)
        server.start()
        target = f"127.0.0.1:{server.port}"
        channel = grpc.insecure_channel(target)
        try:
            _store_second_half(core.journal, stored)
            feed = service.feed
            assert feed is not None
            last = core.journal.last_sequence()
            eventually(lambda: feed.published, "the window holding the last result", until=lambda seq: seq == last)
            yield Serving(pb_grpc.ScoringStub(channel), target, stored, core.metrics, core.journal)
        finally:
            channel.close()
            server.stop(grace=1.0)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    with _serving(tmp_path_factory.mktemp("series-wire")) as s:
        yield s


def _streamed(s: Serving, kinds: list[pb.ResultKind.ValueType], since: int = 0) -> list[pb.Result]:
    """Everything stored after ``since`` of ``kinds``, the stream ending past the last result stored."""
    last = s.stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    request = pb.StreamResultsRequest(since_sequence=since, kinds=kinds, until_sequence=last)
    return list(s.stub.StreamResults(request, timeout=60))


def test_a_stream_that_names_no_kind_sends_image_results_only_as_before(serving: Serving) -> None:
    got = _streamed(serving, [])
    assert [r.sequence for r in got] == serving.stored.images
    assert not any(r.HasField("series") for r in got)
    assert _streamed(serving, [pb.RESULT_KIND_IMAGE]) == got


def test_a_series_stream_sends_the_series_results_and_both_kinds_interleave_in_one_numbering(serving: Serving) -> None:
    series = _streamed(serving, [pb.RESULT_KIND_SERIES])
    assert [r.sequence for r in series] == sorted(serving.stored.series.values())
    assert all(r.HasField("series") and not r.sop_instance_uid for r in series)
    both = _streamed(serving, [pb.RESULT_KIND_SERIES, pb.RESULT_KIND_IMAGE])
    assert [r.sequence for r in both] == sorted(serving.stored.images + list(serving.stored.series.values()))


def test_a_series_stream_resumes_after_its_last_series_result_past_the_images_between(serving: Serving) -> None:
    seqs = serving.stored.series
    got = _streamed(serving, [pb.RESULT_KIND_SERIES], since=seqs["A1"])
    assert [r.sequence for r in got] == [seqs["B1"], seqs["A2"], seqs["D1"]]
    revision = got[1].series
    assert (revision.revision, revision.revises_sequence, revision.series_instance_uid) == (2, seqs["A1"], A)
    assert revision.images_scored == 2  # A's late image counts in its revision
    # From the feed's window (stored while the service ran), past the images between as well.
    window = _streamed(serving, [pb.RESULT_KIND_SERIES], since=seqs["B1"])
    assert [r.sequence for r in window] == [seqs["A2"], seqs["D1"]]


def test_a_bounded_stream_ends_past_its_bound_and_sends_nothing_past_it(serving: Serving) -> None:
    seqs = serving.stored.series
    request = pb.StreamResultsRequest(kinds=[pb.RESULT_KIND_SERIES], until_sequence=seqs["B1"])
    assert [r.sequence for r in serving.stub.StreamResults(request, timeout=60)] == [seqs["A1"], seqs["B1"]]


def test_a_stream_naming_an_unknown_kind_is_refused_with_a_sentence(serving: Serving) -> None:
    request = pb.StreamResultsRequest(kinds=[pb.RESULT_KIND_UNSPECIFIED])
    with pytest.raises(grpc.RpcError) as e:
        list(serving.stub.StreamResults(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RESULT_KIND_SERIES" in (e.value.details() or "")


def test_get_result_by_series_uid_answers_the_live_revision(serving: Serving) -> None:
    seqs = serving.stored.series
    live = serving.stub.GetResult(pb.GetResultRequest(series_instance_uid=A), timeout=10)
    assert live.sequence == seqs["A2"] and live.series.revises_sequence == seqs["A1"]
    assert serving.stub.GetResult(pb.GetResultRequest(series_instance_uid=B), timeout=10).sequence == seqs["B1"]
    # The revised one is still there by its number, as a series result.
    first = serving.stub.GetResult(pb.GetResultRequest(sequence=seqs["A1"]), timeout=10)
    assert first.HasField("series") and first.series.revision == 1


@pytest.mark.parametrize("uid", [C, "1.2.3.999"], ids=["still-open", "never-received"])
def test_get_result_of_a_series_without_a_result_is_not_found_with_a_sentence(serving: Serving, uid: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        serving.stub.GetResult(pb.GetResultRequest(series_instance_uid=uid), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == (
        "No series result for that series_instance_uid: none of its images was received, or it is still assembling."
    )


def test_status_and_the_metrics_count_the_open_series(serving: Serving) -> None:
    assert serving.stub.GetStatus(pb.GetStatusRequest(), timeout=10).open_series == 1  # C
    assert serving.metrics.registry.get_sample_value("appliance_series_open") == 1.0


def test_the_worklist_lists_the_live_series_positive_first_then_by_top_score(serving: Serving) -> None:
    seqs = serving.stored.series
    listed = client.worklist(serving.stub)
    # A's revision replaces its first result; D is positive but scores lower than A; B is negative.
    assert [r.sequence for r in listed] == [seqs["A2"], seqs["D1"], seqs["B1"]]
    assert client.worklist(serving.stub, since=seqs["A2"]) == [listed[1]]


def test_a_series_line_says_the_decision_top_score_images_key_images_and_what_it_revises(serving: Serving) -> None:
    revision = serving.stub.GetResult(pb.GetResultRequest(series_instance_uid=A), timeout=10)
    line = client.format_result(revision)
    assert line.startswith(f"#{revision.sequence:<6} POSITIVE      series {A} (accession ACC-7): glioma=0.875; ")
    assert "2 images scored" in line and "rejected" not in line
    assert f"key images ..{(A + '.1')[-12:]} 0.875" in line  # a UID's tail: the series' instances share its roots
    assert line.endswith(f"; revises #{serving.stored.series['A1']}")


def test_appliance_client_worklist_and_watch_series_print_one_line_per_series(
    serving: Serving, capsys: pytest.CaptureFixture[str]
) -> None:
    seqs = serving.stored.series
    assert client.main(["--target", serving.target, "worklist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"#{seqs[k]}" for k in ("A2", "D1", "B1")]
    assert [line.split()[1] for line in lines] == ["POSITIVE", "POSITIVE", "NEGATIVE"]
    assert client.main(["--target", serving.target, "watch", "--series", "--since", "0", "--no-follow"]) == 0
    watched = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in watched] == [f"#{s}" for s in sorted(seqs.values())]
    argv = ["--target", serving.target, "--json", "watch", "--series", "--images", "--since", "0", "--no-follow"]
    assert client.main(argv) == 0
    both = capsys.readouterr().out.splitlines()
    assert len(both) == len(serving.stored.images) + len(seqs)
    assert sum('"series": {' in line for line in both) == len(seqs)


def test_a_streamed_series_result_is_the_stored_one(serving: Serving) -> None:
    """From the journal (stored before the service started) and from the window (after): the codec's message of
    the stored series result, which reads back as that result."""
    for key in ("A1", "D1"):
        seq = serving.stored.series[key]
        stored = serving.journal.result_by_seq(seq)
        assert stored is not None and stored.kind == "series"
        (streamed,) = _streamed(serving, [pb.RESULT_KIND_SERIES], since=seq - 1)[:1]
        assert streamed == pb.Result.FromString(encoded_stored(stored))
        assert series_from_message(streamed) == stored.series()


def test_an_overlay_of_a_series_result_asks_for_one_of_its_key_images(
    serving: Serving, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seq = serving.stored.series["A1"]
    argv = ["--target", serving.target, "overlay", "--sequence", str(seq)]
    assert client.main([*argv, "--image", str(tmp_path / "a.dcm"), "-o", str(tmp_path / "a.png")]) == 1
    assert f"result #{seq} is a series result: give one of its key images' SOP UIDs" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
