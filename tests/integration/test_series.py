"""Series, not images, all real: DCMTK's storescu as the scanner sends CT series (models/pipeline-test's synthetic
slices, tests/series_data.py) to the daemon, which assembles each series and, once it is complete, sends one
Enhanced SR, one Key Object Selection and a heatmap Secondary Capture per key image to a real Orthanc; the gRPC
stream and Orthanc's REST API are the sources of truth."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import pydicom
import pytest
from pydicom.uid import EnhancedSRStorage, KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from appliance.api.client import live_series, stream
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import APPLIANCE, Daemon, drop, free_port, png_bytes
from tests.peers import needs
from tests.peers.dcmtk import dciodvfy, storescu
from tests.peers.orthanc import Orthanc
from tests.series_data import ct_series, multi_frame
from tests.waiting import eventually

pytestmark = needs("Orthanc", "storescu")

SCANNER, OTHER_SCANNER = "CT_EAST", "CT_WEST"
SERIES = (pb.RESULT_KIND_SERIES,)
BOTH = (pb.RESULT_KIND_IMAGE, pb.RESULT_KIND_SERIES)
OF_INTEREST = "113000"  # DCM "Of Interest" (CID 7010): the KOS's title
KINDS: dict[str, str] = {
    EnhancedSRStorage: "SR",
    KeyObjectSelectionDocumentStorage: "KO",
    SecondaryCaptureImageStorage: "SC",
}


def _appliance(
    make_daemon: type[Daemon], pacs: Orthanc | None, stable_s: float, **overrides: dict[str, object]
) -> tuple[Daemon, int]:
    """The real daemon receiving from both scanners, assembling series quiet for ``stable_s``, and sending each
    series' objects to ``pacs`` (none: no PACS), quick to retry."""
    port = free_port()
    sections: dict[str, dict[str, object]] = {
        "dicom": {
            "enabled": True,
            "port": port,
            "ae_title": APPLIANCE,
            "allowed": [{"ae_title": SCANNER}, {"ae_title": OTHER_SCANNER}],
        },
        "series": {"stable_s": stable_s},
    }
    if pacs is not None:
        sections["pacs"] = {
            "enabled": True,
            "ae_title": pacs.ae_title,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            "calling_ae_title": APPLIANCE,
            "retry_s": 0.2,
            "retry_max_s": 1.0,
            "report_per": "series",
        }
    d = make_daemon(**sections, **overrides)
    d.start()
    return d, port


def _send(files: Sequence[Path], port: int, calling: str = SCANNER) -> None:
    done = storescu(files, "127.0.0.1", port, calling, APPLIANCE)
    assert done.returncode == 0, done.stdout + done.stderr


def _follow(
    d: Daemon, count: int, kinds: Sequence[pb.ResultKind.ValueType] = (), since: int = 0, timeout: float = 90.0
) -> list[pb.Result]:
    """The next ``count`` results of ``kinds`` after ``since``, followed live as a terminal does."""
    return d.collect(count, since, timeout, kinds)


def _stored(d: Daemon, kinds: Sequence[pb.ResultKind.ValueType] = ()) -> list[pb.Result]:
    """Every result of ``kinds`` stored now: the stream read up to Status.last_sequence, where it ends."""
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        until = stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
        return list(stream(stub, 0, kinds, until)) if until else []


def _get(d: Daemon, **key: object) -> pb.Result:
    with d.channel() as ch:
        return pb_grpc.ScoringStub(ch).GetResult(pb.GetResultRequest(**key), timeout=10)  # type: ignore[arg-type]


def _until(what: str, check: Callable[[], object], d: Daemon, timeout: float = 90.0) -> None:
    eventually(check, what, timeout=timeout, every=0.1, context=lambda: d.log()[-4000:])


def _delivered(d: Daemon, series_uid: str) -> None:
    """Wait until the series' live result's objects are all in the PACS (its SR delivered, the outbox empty)."""
    _until(
        "the series' objects delivered",
        lambda: (
            _get(d, series_instance_uid=series_uid).series.delivery.state == pb.DELIVERY_DELIVERED
            and d.status().outbox_pending == 0
        ),
        d,
    )


def _held(pacs: Orthanc) -> dict[str, list[tuple[bytes, pydicom.Dataset]]]:
    """What Orthanc holds, fetched back as files: by kind (SR, KO, SC; else the SOP Class UID), bytes and dataset."""
    out: dict[str, list[tuple[bytes, pydicom.Dataset]]] = {}
    for orthanc_id in pacs.instances():
        data = pacs.get_bytes(f"/instances/{orthanc_id}/file")
        ds = pydicom.dcmread(io.BytesIO(data))
        out.setdefault(KINDS.get(str(ds.SOPClassUID), str(ds.SOPClassUID)), []).append((data, ds))
    return out


def _counts(held: dict[str, list[tuple[bytes, pydicom.Dataset]]]) -> dict[str, int]:
    return {kind: len(objects) for kind, objects in sorted(held.items())}


def _kos_references(kos: pydicom.Dataset) -> tuple[list[str], list[str]]:
    """The SOP Instance UIDs a KOS references in its content tree, and in its evidence sequence."""
    content = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    evidence = [
        sop.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    return content, evidence


def _predecessors(sr: pydicom.Dataset) -> list[str]:
    return [
        sop.ReferencedSOPInstanceUID
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


def _valid(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    rc, errors = dciodvfy(path)
    assert rc == 0 and errors == [], (name, errors)


def test_a_40_slice_series_gives_one_sr_one_kos_and_three_key_images(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    d, port = _appliance(make_daemon, pacs, stable_s=1)
    ct = ct_series(tmp_path / "ct", 40, marked={9, 20, 31})
    _send(ct.files, port)
    images = _follow(d, 40)
    assert sorted(r.sop_instance_uid for r in images) == sorted(ct.sop_uids)
    assert {r.sop_instance_uid for r in images if r.decision == pb.DECISION_POSITIVE} == ct.marked
    (result,) = _follow(d, 1, SERIES)
    s = result.series
    assert (s.study_instance_uid, s.series_instance_uid) == (ct.study_uid, ct.series_uid)
    assert (s.images_scored, s.images_rejected, s.revision, s.revises_sequence) == (40, 0, 1, 0)
    assert (s.decision, list(s.findings), s.key_label) == (pb.DECISION_POSITIVE, ["lesion"], "lesion")
    assert s.completion == pb.COMPLETION_STABLE
    assert {k.sop_instance_uid for k in s.key_images} == ct.marked and len(s.key_images) == 3
    assert result.sequence > max(r.sequence for r in images)  # stored once its images were
    _delivered(d, ct.series_uid)

    held = _held(pacs)
    assert _counts(held) == {"KO": 1, "SC": 3, "SR": 1}  # nothing else, each once
    ((sr_bytes, sr),) = held["SR"]
    ((kos_bytes, kos),) = held["KO"]
    assert sr.SOPInstanceUID == s.report_sop_instance_uid
    assert sr.StudyInstanceUID == kos.StudyInstanceUID == ct.study_uid  # in the scanned study
    assert sr.SeriesInstanceUID != ct.series_uid and kos.SeriesInstanceUID != ct.series_uid
    assert kos.ConceptNameCodeSequence[0].CodeValue == OF_INTEREST
    content, evidence = _kos_references(kos)
    assert sorted(content) == sorted(evidence) == sorted(ct.marked)  # exactly the three slices
    sr_images = {i.value for i in pacs.content_items(pacs.find_sop(sr.SOPInstanceUID) or "") if i.value_type == "IMAGE"}
    assert sr_images == ct.marked
    sources = sorted(sc.SourceImageSequence[0].ReferencedSOPInstanceUID for _, sc in held["SC"])
    assert sources == sorted(ct.marked)
    assert {sc.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID for _, sc in held["SC"]} == {sr.SOPInstanceUID}
    for name, data in [("sr", sr_bytes), ("kos", kos_bytes)] + [(f"sc{n}", b) for n, (b, _) in enumerate(held["SC"])]:
        _valid(tmp_path, name, data)

    slice_of = {uid: n for n, uid in enumerate(ct.sop_uids)}
    by_kind = {kind: [(str(ds.Modality), len(data)) for data, ds in objects] for kind, objects in held.items()}
    print(f"Orthanc holds, for a 40-slice series (slices 9, 20, 31 marked): {_counts(held)}; {by_kind}")
    print(f"the KOS references slices {sorted(slice_of[u] for u in content)} (content tree) and "
          f"{sorted(slice_of[u] for u in evidence)} (evidence); key images by score: "
          f"{[(slice_of[k.sop_instance_uid], round(k.score, 3)) for k in s.key_images]}")  # fmt: skip


def test_two_associations_make_one_series_and_a_late_slice_one_revision_naming_its_predecessor(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    d, port = _appliance(make_daemon, pacs, stable_s=3)
    ct = ct_series(tmp_path / "ct", 40, marked={5, 18, 33})
    _send(ct.files[:20], port)
    _send(ct.files[20:], port)  # a second association, well within the quiet period
    (first,) = _follow(d, 1, SERIES)
    assert (first.series.images_scored, first.series.revision) == (40, 1)
    _delivered(d, ct.series_uid)

    late = ct_series(tmp_path / "late", 1, study_uid=ct.study_uid, series_uid=ct.series_uid, first_number=41)
    _send(late.files, port)
    (revised,) = _follow(d, 1, SERIES, since=first.sequence)
    r = revised.series
    assert (r.series_instance_uid, r.images_scored, r.revision) == (ct.series_uid, 41, 2)
    assert r.revises_sequence == first.sequence
    assert r.revises_report_sop_instance_uid == first.series.report_sop_instance_uid != r.report_sop_instance_uid
    assert {k.sop_instance_uid for k in r.key_images} == ct.marked  # the late slice is clear
    live = _get(d, series_instance_uid=ct.series_uid)
    assert (live.sequence, live.series.revision) == (revised.sequence, 2)
    series_results = _stored(d, SERIES)
    assert [x.sequence for x in series_results] == [first.sequence, revised.sequence]
    assert [x.sequence for x in live_series(series_results)] == [revised.sequence]  # never two live
    _delivered(d, ct.series_uid)

    held = _held(pacs)
    srs = {str(ds.SOPInstanceUID): ds for _, ds in held["SR"]}
    assert set(srs) == {first.series.report_sop_instance_uid, r.report_sop_instance_uid}
    assert _predecessors(srs[r.report_sop_instance_uid]) == [first.series.report_sop_instance_uid]
    assert _predecessors(srs[first.series.report_sop_instance_uid]) == []
    # The revision's KOS is a new document; its key images' heatmaps are the same instances, kept once.
    assert _counts(held) == {"KO": 2, "SC": 3, "SR": 2}
    print(f"after a late slice, Orthanc holds {_counts(held)}; the revision's SR names its predecessor")


def test_kill_9_during_assembly_loses_and_doubles_nothing(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    # Long enough that the series is surely open at the kill; the restart waits a short one again.
    d, port = _appliance(make_daemon, pacs, stable_s=600)
    ct = ct_series(tmp_path / "ct", 40, marked={7, 25, 36})
    _send(ct.files[:20], port)
    before = _follow(d, 20)
    _until("the series open with its first 20 images", lambda: d.status().open_series == 1, d)
    assert _stored(d, SERIES) == []
    d.kill()

    d.overrides["series"]["stable_s"] = 1
    d.start()
    _send(ct.files[20:], port)
    (result,) = _follow(d, 1, SERIES)
    s = result.series
    assert (s.images_scored, s.revision, s.decision) == (40, 1, pb.DECISION_POSITIVE)
    assert {k.sop_instance_uid for k in s.key_images} == ct.marked  # one key image from before the kill
    _delivered(d, ct.series_uid)
    everything = _stored(d, BOTH)
    images = [x for x in everything if not x.HasField("series")]
    assert sorted(x.sop_instance_uid for x in images) == sorted(ct.sop_uids)  # each image once
    assert [x.sequence for x in images[:20]] == [x.sequence for x in before]
    assert Counter(x.sequence for x in everything).most_common(1)[0][1] == 1
    assert [x.sequence for x in everything if x.HasField("series")] == [result.sequence]
    assert d.status().open_series == 0
    assert _counts(_held(pacs)) == {"KO": 1, "SC": 3, "SR": 1}


def test_kill_9_during_delivery_sends_each_object_once(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, pacs, stable_s=1)
    pacs.kill()  # away: the series' objects wait in the outbox
    ct = ct_series(tmp_path / "ct", 40, marked={2, 19, 30})
    _send(ct.files, port)
    (result,) = _follow(d, 1, SERIES)
    _until("the series' five objects waiting", lambda: d.status().outbox_pending == 5, d)
    _until(
        "its SR tried while the PACS is away",
        lambda: _get(d, series_instance_uid=ct.series_uid).series.delivery.attempts >= 1,
        d,
    )
    d.kill()
    pacs.start()
    d.start()
    _delivered(d, ct.series_uid)
    held = _held(pacs)
    assert _counts(held) == {"KO": 1, "SC": 3, "SR": 1}
    ((_, sr),) = held["SR"]
    assert sr.SOPInstanceUID == result.series.report_sop_instance_uid
    everything = _stored(d, BOTH)
    assert Counter(x.sequence for x in everything).most_common(1)[0][1] == 1
    assert [x.sequence for x in everything if x.HasField("series")] == [result.sequence]  # not made again
    assert len([x for x in everything if not x.HasField("series")]) == 40


def test_two_interleaved_series_from_two_scanners_stay_apart(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, pacs, stable_s=3)
    east = ct_series(tmp_path / "east", 12, marked={3, 7, 10})
    west = ct_series(tmp_path / "west", 9, seed=3131)  # another patient's study, nothing marked
    for n in range(3):  # alternately, one association each: A B A B A B
        _send(east.files[4 * n : 4 * n + 4], port, SCANNER)
        _send(west.files[3 * n : 3 * n + 3], port, OTHER_SCANNER)
    results = {r.series.series_instance_uid: r.series for r in _follow(d, 2, SERIES)}
    assert set(results) == {east.series_uid, west.series_uid}
    a, b = results[east.series_uid], results[west.series_uid]
    assert (a.study_instance_uid, a.images_scored, a.decision) == (east.study_uid, 12, pb.DECISION_POSITIVE)
    assert (b.study_instance_uid, b.images_scored, b.decision) == (west.study_uid, 9, pb.DECISION_NEGATIVE)
    assert {k.sop_instance_uid for k in a.key_images} == east.marked
    assert {k.sop_instance_uid for k in b.key_images} <= set(west.sop_uids) and len(b.key_images) == 3
    _delivered(d, east.series_uid)
    _delivered(d, west.series_uid)

    held = _held(pacs)
    assert _counts(held) == {"KO": 2, "SC": 6, "SR": 2}
    for series, result in ((east, a), (west, b)):
        (kos,) = [ds for _, ds in held["KO"] if ds.StudyInstanceUID == series.study_uid]
        content, _ = _kos_references(kos)
        assert set(content) == {k.sop_instance_uid for k in result.key_images}
        (sr,) = [ds for _, ds in held["SR"] if ds.StudyInstanceUID == series.study_uid]
        assert sr.SOPInstanceUID == result.report_sop_instance_uid
        sources = {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for _, sc in held["SC"]}
        assert len(sources & set(series.sop_uids)) == 3


def test_a_multi_frame_instance_completes_its_series_at_once(make_daemon, pacs: Orthanc, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, pacs, stable_s=600)  # far longer than the test: only the header can end it
    series_uid, sop_uid, frames = multi_frame(tmp_path / "enhanced-mr.dcm")
    _send([tmp_path / "enhanced-mr.dcm"], port)
    (result,) = _follow(d, 1, SERIES)
    s = result.series
    assert (s.series_instance_uid, s.completion) == (series_uid, pb.COMPLETION_HEADER)
    assert (s.images_scored, s.images_rejected, s.revision) == (frames, 0, 1)
    assert {k.sop_instance_uid for k in s.key_images} == {sop_uid} and len(s.key_images) == 3
    assert d.status().open_series == 0
    _delivered(d, series_uid)
    held = _held(pacs)
    ((_, kos),) = held["KO"]
    content, _ = _kos_references(kos)
    assert content == [sop_uid]  # one instance, its key frames by number
    (reference,) = [item.ReferencedSOPSequence[0] for item in kos.ContentSequence if item.ValueType == "IMAGE"]
    assert sorted(reference.ReferencedFrameNumber) == sorted(k.frame_index + 1 for k in s.key_images)


def test_a_terminal_gets_series_results_only_when_it_asks(make_daemon, tmp_path: Path) -> None:
    d, port = _appliance(make_daemon, None, stable_s=1)  # no PACS: series are assembled all the same
    ct = ct_series(tmp_path / "ct", 5, marked={2})
    drop(d.incoming, "photo.png", png_bytes(7))  # not DICOM: a result of its own, in no series
    _send(ct.files, port)
    (series,) = _follow(d, 1, SERIES)
    assert series.series.series_instance_uid == ct.series_uid and series.series.images_scored == 5
    _follow(d, 6)  # every image result stored too

    images = _stored(d)  # what a terminal asking nothing gets: image results, as before series existed
    assert len(images) == 6 and not any(r.HasField("series") for r in images)
    assert {r.file_name for r in images if not r.sop_instance_uid} == {"photo.png"}
    only_series = _stored(d, SERIES)
    assert [r.sequence for r in only_series] == [series.sequence] and only_series[0].series == series.series
    both = _stored(d, BOTH)
    assert [r.sequence for r in both] == sorted({r.sequence for r in images} | {series.sequence})
    assert _get(d, sequence=series.sequence).series.series_instance_uid == ct.series_uid
    assert _get(d, series_instance_uid=ct.series_uid).sequence == series.sequence
    with pytest.raises(grpc.RpcError) as none:
        _get(d, series_instance_uid="1.2.3.4")
    assert none.value.code() == grpc.StatusCode.NOT_FOUND
