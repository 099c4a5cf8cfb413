"""The appliance between a scanner and a PACS, all real: DCMTK's storescu as the scanner, the daemon's DICOM
receiver, and a real Orthanc as the PACS its reports (Enhanced SR, TID 1500) go to through the outbox."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import APPLIANCE, Daemon, free_port
from tests.peers import needs, require
from tests.peers.dcmtk import dciodvfy, storescu
from tests.peers.orthanc import Code, Orthanc
from tests.waiting import eventually

pytestmark = needs("Orthanc", "storescu")

SCANNER = "SCANNER"
LESION = Code("52988006", "SCT", "Lesion")  # models/pipeline-test/model.toml's code for its label
PRESENT, ABSENT = "52101004", "272519000"


def _appliance(
    make_daemon: type[Daemon],
    pacs: Orthanc,
    pacs_overlays: bool = True,
    report_per: str = "image",
    **overrides: dict[str, object],
) -> tuple[Daemon, int]:
    """The real daemon receiving from SCANNER and sending to a real Orthanc, quick to retry. A report per image
    unless told: these tests are about each image's report (test_series.py has the series' objects)."""
    port = free_port()
    d = make_daemon(
        dicom={"enabled": True, "port": port, "ae_title": APPLIANCE, "allowed": [{"ae_title": SCANNER}]},
        pacs={
            "enabled": True,
            "ae_title": pacs.ae_title,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            "calling_ae_title": APPLIANCE,
            "retry_s": 0.2,
            "retry_max_s": 1.0,
            "overlays": pacs_overlays,
            "report_per": report_per,
        },
        **overrides,
    )
    d.start()
    return d, port


def _study(folder: Path, count: int) -> list[str]:
    """``count`` CT images of one study (pydicom's CT_small, each its own instance); their SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    uids = []
    for n in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"ct{n:03d}.dcm", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _send(files: list[Path], port: int, calling: str = SCANNER, *extra: str) -> str:
    done = storescu(files, "127.0.0.1", port, calling, APPLIANCE, extra)
    return done.stdout + done.stderr


def _until(what: str, check: Callable[[], bool], d: Daemon, timeout: float = 90.0) -> None:
    eventually(check, what, timeout=timeout, every=0.1, context=lambda: d.log()[-4000:])


def _result(d: Daemon, seq: int) -> pb.Result:
    with d.channel() as ch:
        return pb_grpc.ScoringStub(ch).GetResult(pb.GetResultRequest(sequence=seq), timeout=10)


def _delivered(d: Daemon, results: list[pb.Result]) -> Callable[[], bool]:
    return lambda: all(_result(d, r.sequence).delivery.state == pb.DELIVERY_DELIVERED for r in results)


def test_a_study_sent_by_the_scanner_reaches_the_pacs_as_reports(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, pacs)
    uids = _study(tmp_path / "study", 6)
    output = _send(sorted((tmp_path / "study").iterdir()), port)
    results = d.collect(6)
    assert {r.sop_instance_uid for r in results} == set(uids), output
    assert {r.source for r in results} == {"dicom"} and {r.outcome for r in results} == {pb.OUTCOME_SCORED}
    pacs.wait_for_instances(6, timeout=60)
    _until("every report delivered", _delivered(d, results), d)
    assert d.status().outbox_pending == 0

    for r in results:
        delivery = _result(d, r.sequence).delivery
        report = pacs.find_sop(delivery.report_sop_instance_uid)
        assert report is not None and delivery.attempts == 0
        tags = pacs.tags(report)
        assert tags["Modality"] == "SR" and tags["StudyInstanceUID"] != "" and tags["SeriesInstanceUID"] != ""
        items = pacs.content_items(report)
        assert r.sop_instance_uid in [i.value for i in items if i.value_type == "IMAGE"]  # the scored image
        evaluation = next(i for i in items if i.value_type == "CODE" and i.name == LESION)
        assert isinstance(evaluation.value, Code)
        assert evaluation.value.value == (PRESENT if "lesion" in r.findings else ABSENT)
        (score,) = [i.value for i in items if i.value_type == "NUM"]
        assert isinstance(score, float) and score == pytest.approx(r.scores[0].score, abs=1e-6)
    source = pydicom.dcmread(tmp_path / "study" / "ct000.dcm", stop_before_pixels=True)
    report_tags = pacs.tags(pacs.find_sop(_result(d, results[0].sequence).delivery.report_sop_instance_uid) or "")
    assert report_tags["StudyInstanceUID"] == source.StudyInstanceUID  # in the scanned study, a series of its own
    assert report_tags["SeriesInstanceUID"] != source.SeriesInstanceUID


def test_a_report_passes_dciodvfy(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    require("dciodvfy")
    d, port = _appliance(make_daemon, pacs)
    _study(tmp_path / "one", 1)
    _send([tmp_path / "one" / "ct000.dcm"], port)
    (result,) = d.collect(1)
    _until("the report delivered", _delivered(d, [result]), d)
    orthanc_id = pacs.find_sop(_result(d, result.sequence).delivery.report_sop_instance_uid)
    assert orthanc_id is not None
    path = tmp_path / "report.dcm"
    path.write_bytes(pacs.get_bytes(f"/instances/{orthanc_id}/file"))
    rc, errors = dciodvfy(path)
    assert rc == 0 and errors == []


def test_an_unknown_scanner_is_refused_at_association(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, pacs)
    _study(tmp_path / "study", 1)
    done = storescu([tmp_path / "study" / "ct000.dcm"], "127.0.0.1", port, "STRANGER", APPLIANCE)
    assert done.returncode != 0
    assert "Calling AE Title Not Recognized" in done.stdout + done.stderr
    wrong = storescu([tmp_path / "study" / "ct000.dcm"], "127.0.0.1", port, SCANNER, "SOMEONE")
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    status = d.status()
    assert status.queue_depth + status.scored + status.rejected == 0  # nothing was taken in
    # Each refusal said once, with the peer's host and validated AE title (throttled: a count a minute after).
    assert "DICOM connection refused (calling_ae) from 127.0.0.1, calling AE 'STRANGER'" in d.log()
    assert "DICOM connection refused (called_ae) from 127.0.0.1, calling AE 'SCANNER'" in d.log()


def test_a_pacs_away_for_a_while_loses_nothing_and_gets_each_report_once(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    d, port = _appliance(make_daemon, pacs)
    pacs.stop()
    uids = _study(tmp_path / "study", 5)
    _send(sorted((tmp_path / "study").iterdir()), port)
    results = d.collect(5)
    assert {r.sop_instance_uid for r in results} == set(uids)
    # With each report its heatmap overlay (pipeline-test declares a heatmap): two objects per image.
    _until("five reports and their overlays waiting", lambda: d.status().outbox_pending == 10, d)
    _until("retried while away", lambda: all(_result(d, r.sequence).delivery.attempts >= 1 for r in results), d)
    waiting = _result(d, results[0].sequence).delivery
    assert waiting.state == pb.DELIVERY_PENDING and waiting.reason != ""
    pacs.start()
    _until("every report delivered", _delivered(d, results), d)
    _until("every overlay delivered", lambda: d.status().outbox_pending == 0, d)
    assert len(pacs.instances()) == 10  # each once
    reports = {_result(d, r.sequence).delivery.report_sop_instance_uid for r in results}
    assert len(reports) == 5 and all(pacs.find_sop(uid) for uid in reports)
    tries = sorted(_result(d, r.sequence).delivery.attempts for r in results)
    print(f"sent 5 with the PACS away; scored: 5; failed tries per report: {tries}; delivered once each: 5")


def _acknowledged(output: str) -> set[str]:
    """The files `storescu -v` got a success for (each 'Sending file' line, then its response)."""
    done, current = set(), ""
    for line in output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.add(Path(current).name)
    return done


def test_kill_9_during_a_burst_scores_every_acknowledged_instance_once(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    """The scanner sends 40 images; the daemon is killed mid-burst and restarted; the scanner sends again only
    what it got no success for. Every image is scored exactly once: the acknowledged ones from the journal
    and the spool alone."""
    d, port = _appliance(make_daemon, pacs)
    uids = _study(tmp_path / "burst", 40)
    files = sorted((tmp_path / "burst").iterdir())
    first: list[str] = []
    sending = threading.Thread(target=lambda: first.append(_send(files, port, SCANNER, "-v")))
    sending.start()
    _until("a few images taken in", lambda: d.status().queue_depth + d.status().scored >= 5, d)
    d.kill()
    sending.join(timeout=120)
    acknowledged = _acknowledged(first[0])
    assert 1 <= len(acknowledged) < 40, first[0][-2000:]  # the kill came mid-burst
    d.start()
    _send([f for f in files if f.name not in acknowledged], port)
    results = d.collect(40, timeout=120)
    scored = [r for r in results if r.outcome == pb.OUTCOME_SCORED]
    assert sorted(r.sop_instance_uid for r in scored) == sorted(uids)  # every image scored, none twice
    status = d.status()
    assert status.scored == 40 and status.queue_depth == 0
    pacs.wait_for_instances(80, timeout=120)  # a report and a heatmap overlay per image
    _until("every report delivered", _delivered(d, scored), d)
    _until("every overlay delivered", lambda: d.status().outbox_pending == 0, d)
    assert len(pacs.instances()) == 80
    again = 40 - len(acknowledged)
    print(f"sent 40; acknowledged before the kill: {len(acknowledged)}; sent again: {again}; scored: {len(scored)}")


def test_a_rejected_instance_s_result_is_found_by_its_sop_instance_uid(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    """An instance the scanner sent that cannot be scored (its photometric interpretation is not one the appliance
    reads): its rejected result names the instance, so GetResult by SOP Instance UID finds it."""
    d, port = _appliance(make_daemon, pacs)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "HSV"  # retired, and never a CT's: refused when decoded, after the header
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "hsv.dcm"
    ds.save_as(path, enforce_file_format=True)
    said = _send([path], port)
    (streamed,) = d.collect(1)
    assert streamed.outcome == pb.OUTCOME_REJECTED, said
    assert streamed.rejection.code == "unsupported_pixel_format" and streamed.sop_instance_uid == ds.SOPInstanceUID
    # Refused after its header was read: the result names its study and series too, from the decode worker.
    assert (streamed.study_instance_uid, streamed.series_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    with d.channel() as ch:
        found = pb_grpc.ScoringStub(ch).GetResult(pb.GetResultRequest(sop_instance_uid=ds.SOPInstanceUID), timeout=10)
    assert (found.sequence, found.outcome) == (streamed.sequence, pb.OUTCOME_REJECTED)
    assert pacs.instances() == []  # nothing scored, nothing sent
