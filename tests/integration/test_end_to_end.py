"""Real files dropped into a real folder come out as results on a real gRPC stream."""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydicom.data import get_testdata_file

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import bare_dicom, drop, free_port, jpeg_bytes, png_bytes

# Real DICOM from pydicom's test data and pydicom-data: CT, MR, CR (MONOCHROME1), NM, several syntaxes.
DICOM_FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian, rescale
    "MR_small.dcm",  # MR, window center/width
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG-LL.dcm",  # JPEG lossless, process 14
    "JPGExtended.dcm",  # JPEG extended, 12 bit
    "MR_small_bigendian.dcm",  # explicit VR big endian (retired, still found in archives)
    "examples_palette.dcm",  # PALETTE COLOR
    "SC_rgb_jpeg.dcm",  # JPEG baseline, colour
    "RG1_J2KR.dcm",  # CR radiograph, MONOCHROME1, JPEG 2000, 1955x1841
]


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing from pydicom's test data"
    return str(path)


def test_dropped_dicom_png_and_jpeg_are_scored_and_streamed(make_daemon) -> None:
    d = make_daemon()
    d.start()
    expected = {}
    for name in DICOM_FILES:
        src = _testfile(name)
        shutil.copy(src, d.incoming / name)  # a plain copy: picked up on close-write
        expected[name] = pydicom.dcmread(src, stop_before_pixels=True, force=True)
    drop(d.incoming, "bare.dcm", bare_dicom("CT_small.dcm"))  # no preamble, no file meta: old archives
    drop(d.incoming, "scan8.png", png_bytes(1))
    drop(d.incoming, "scan16.png", png_bytes(2, bit16=True))
    drop(d.incoming, "photo.jpg", jpeg_bytes(3))
    (d.incoming / "study1").mkdir()
    drop(d.incoming / "study1", "nested.png", png_bytes(4))
    total = len(DICOM_FILES) + 5

    results = d.collect(total)
    by_name = {r.file_name: r for r in results}
    assert len(by_name) == total, sorted(by_name)
    assert [r.sequence for r in results] == list(range(1, total + 1))
    for r in results:
        assert r.outcome == pb.OUTCOME_SCORED, (r.file_name, r.rejection.code, r.rejection.message)
        assert r.model_name == "pipeline-test" and r.backend == "onnxruntime"
        assert [s.label for s in r.scores] == ["lesion"] and 0.0 <= r.scores[0].score <= 1.0
        assert r.decision in (pb.DECISION_POSITIVE, pb.DECISION_NEGATIVE)
        assert len(r.content_hash) == 64 and r.timings.total_ms > 0 and r.timings.infer_ms > 0
    for name, ds in expected.items():
        r = by_name[name]
        assert r.sop_instance_uid == ds.SOPInstanceUID
        assert r.study_instance_uid == ds.StudyInstanceUID
        assert r.series_instance_uid == ds.SeriesInstanceUID
        assert r.accession_number == str(ds.get("AccessionNumber", "") or "")
    # Scored files are moved aside (default after_scoring = "move"), nothing is left behind.
    eventually(
        lambda: [p for p in d.incoming.rglob("*") if p.is_file()],
        "the watch folder emptied",
        until=lambda left: not left,
        timeout=10,
    )
    assert [p for p in d.incoming.rglob("*") if p.is_file()] == []
    assert len(list(d.processed.iterdir())) == total
    status = d.status()
    assert (status.scored, status.rejected, status.queue_depth, status.last_sequence) == (total, 0, 0, total)
    assert d.stop() == 0


def test_a_terminal_resumes_from_a_sequence_and_looks_results_up(make_daemon) -> None:
    d = make_daemon()
    d.start()
    for n in range(6):
        drop(d.incoming, f"img{n}.png", png_bytes(100 + n))
    shutil.copy(_testfile("CT_small.dcm"), d.incoming / "ct.dcm")
    first = d.collect(7)
    resumed = d.collect(3, since=4)
    assert [r.sequence for r in resumed] == [5, 6, 7]
    assert [r.SerializeToString() for r in resumed] == [r.SerializeToString() for r in first[4:]]
    # A live follower gets results stored after it connected.
    drop(d.incoming, "late.png", png_bytes(200))
    late = d.collect(1, since=7)
    assert late[0].sequence == 8 and late[0].file_name == "late.png"
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        assert stub.GetResult(pb.GetResultRequest(sequence=3), timeout=5).sequence == 3
        ct_uid = pydicom.dcmread(_testfile("CT_small.dcm")).SOPInstanceUID
        by_uid = stub.GetResult(pb.GetResultRequest(sop_instance_uid=ct_uid), timeout=5)
        assert by_uid.file_name == "ct.dcm"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetResult(pb.GetResultRequest(sequence=999), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert [m.name for m in models] == ["pipeline-test"] and list(models[0].input_shape) == [1, 64, 64]


def test_same_content_twice_is_scored_once(make_daemon) -> None:
    d = make_daemon()
    d.start()
    data = png_bytes(7)
    drop(d.incoming, "a.png", data)
    (first,) = d.collect(1)
    drop(d.incoming, "copy-of-a.png", data)
    drop(d.incoming, "b.png", png_bytes(8))
    (second,) = d.collect(1, since=first.sequence)
    assert second.file_name == "b.png"  # the copy made no result of its own
    eventually(d.status, "the copy counted as a duplicate", until=lambda status: status.duplicates == 1, timeout=10)
    assert d.status().duplicates == 1 and d.status().scored == 2


def test_score_rpc_client_and_offline_cli_agree(make_daemon, tmp_path) -> None:
    d = make_daemon()
    d.start()
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(11, lesion=True))
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        r = stub.Score(pb.ScoreRequest(image=image.read_bytes(), file_name="one.png"), timeout=60)
        again = stub.Score(pb.ScoreRequest(image=image.read_bytes(), file_name="one-again.png"), timeout=60)
        bad = stub.Score(pb.ScoreRequest(image=b"not an image at all", file_name="x.bin"), timeout=60)
    assert r.outcome == pb.OUTCOME_SCORED and r.source == "grpc" and r.sequence == 1
    assert again.sequence == r.sequence  # same bytes: the stored result, not a second scoring
    assert bad.outcome == pb.OUTCOME_REJECTED and bad.rejection.code == "unsupported_format"
    # The Score result is on the stream like a dropped file's.
    assert [x.file_name for x in d.collect(2)] == ["one.png", "x.bin"]

    client = subprocess.run(
        [sys.executable, "-m", "appliance.api.client", "--target", d.target, "--json", "score", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert client.returncode == 0, client.stderr
    assert '"sequence": "1"' in client.stdout

    watch = subprocess.run(
        [sys.executable, "-m", "appliance.api.client", "--target", d.target, "watch", "--since", "0", "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watch.returncode == 0, watch.stderr
    lines = watch.stdout.splitlines()
    assert lines[0].startswith("#1") and "one.png" in lines[0] and "lesion=" in lines[0]
    assert lines[1].startswith("#2") and "REJECTED" in lines[1] and "unsupported_format" in lines[1]

    offline = subprocess.run(
        [sys.executable, "-m", "appliance.app.cli", "score", "--model", str(d.model), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert offline.returncode == 0, offline.stderr
    import json

    row = json.loads(offline.stdout.splitlines()[0])
    assert row["outcome"] == "OUTCOME_SCORED"
    assert row["scores"][0]["score"] == pytest.approx(r.scores[0].score, abs=1e-6)


def test_health_and_reflection(make_daemon) -> None:
    d = make_daemon()
    d.start()
    with d.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for resp in responses for s in resp.list_services_response.service}
    assert {"appliance.v1.Scoring", "grpc.health.v1.Health"} <= names


def test_hidden_and_partial_files_wait_until_renamed(make_daemon) -> None:
    metrics_port = free_port()
    d = make_daemon(server={"metrics_port": metrics_port})
    d.start()
    (d.incoming / ".hidden.png").write_bytes(png_bytes(20))
    partial = d.incoming / "upload.png.part"
    partial.write_bytes(png_bytes(21))
    drop(d.incoming, "marker.png", png_bytes(22))
    (r,) = d.collect(1)
    assert r.file_name == "marker.png"
    # Files are taken in the order their events come: a dotfile or .part file taken would have entered the
    # stages before the marker, and be counted once they are empty.
    status = d.settled(metrics_port)
    counts = (status.scored, status.rejected, status.duplicates, status.queue_depth, status.last_sequence)
    assert counts == (1, 0, 0, 0, 1)  # neither the dotfile nor the .part file was taken
    partial.rename(d.incoming / "upload.png")
    (r2,) = d.collect(1, since=1)
    assert r2.file_name == "upload.png"


def test_files_dropped_while_down_are_scored_at_start(make_daemon) -> None:
    d = make_daemon()
    d.start()
    drop(d.incoming, "before.png", png_bytes(30))
    d.collect(1)
    assert d.stop() == 0
    for n in range(3):
        drop(d.incoming, f"while-down-{n}.png", png_bytes(31 + n))
    d.start()
    results = d.collect(3, since=1)
    assert sorted(r.file_name for r in results) == [f"while-down-{n}.png" for n in range(3)]


def test_multiframe_is_scored_per_frame_or_rejected_as_configured(make_daemon, tmp_path) -> None:
    src = _testfile("emri_small.dcm")  # MR, 10 frames
    d = make_daemon()
    d.start()
    shutil.copy(src, d.incoming / "multi.dcm")
    frames = d.collect(10)
    assert [r.frame_index for r in frames] == list(range(10))
    assert {r.frame_count for r in frames} == {10} and {r.file_name for r in frames} == {"multi.dcm"}
    assert d.stop() == 0

    strict = make_daemon(limits={"multiframe": "reject"})
    strict.root = tmp_path / "strict"
    strict.port = 0
    strict.start()
    shutil.copy(src, strict.incoming / "multi.dcm")
    (r,) = strict.collect(1)
    assert r.outcome == pb.OUTCOME_REJECTED and r.rejection.code == "multiframe_rejected"


def test_watching_terminal_survives_a_daemon_restart_and_misses_nothing(make_daemon) -> None:
    d = make_daemon()
    d.start()
    watch = subprocess.Popen(
        [sys.executable, "-m", "appliance.api.client", "--target", d.target, "watch", "--since", "0", "--limit", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    drop(d.incoming, "before-restart.png", png_bytes(60))
    assert watch.stdout is not None
    first = watch.stdout.readline()  # the terminal has shown #1 before the daemon goes down
    assert d.stop() == 0
    drop(d.incoming, "while-down.png", png_bytes(61))  # stored after the restart, while the terminal waits
    d.start()
    drop(d.incoming, "after-restart.png", png_bytes(62))
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    lines = [first, *out.splitlines()]
    assert [line.split()[0] for line in lines] == ["#1", "#2", "#3"]
    assert "before-restart.png" in lines[0]
    assert {"while-down.png", "after-restart.png"} == {lines[1].split()[2].rstrip(":"), lines[2].split()[2].rstrip(":")}
    assert "resuming after #1" in err
