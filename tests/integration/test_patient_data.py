"""No patient data leaves the daemon through its log, .reason.txt files, /metrics or gRPC error messages,
even at DEBUG and from hostile headers; and no header value can forge a log line."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import DataElement

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.delivery.test_overlay import anonymised_ct
from tests.imaging import hostile
from tests.integration.test_dicom import APPLIANCE, SCANNER, _appliance, _until
from tests.peers import require
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import Orthanc, RemoteAe
from tests.waiting import eventually

from .conftest import drop, free_port

MARKERS = {
    "PatientName": "Zzmarker^Janet",
    "PatientID": "PIDMARK4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACCMARK99",
}
FORGED_MODALITY = "OT\n2026-01-01 00:00:00,000 CRITICAL appliance patient Zzmarker^Janet"
BAD_UID = "ZZUID^Janet^19010203"  # pydicom warns about it, value and all, where it is not silenced
NAME = "Zzmarker^Janet_19010203"
LEAKS = ["Zzmarker", "Janet", "PIDMARK4711", "19010203", "ACCMARK99", "ZZUID"]
LEVELS = r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)"


def _dicom(seed: int, pixels: bool = True, frames_of_data: int = 1, **values: object) -> bytes:
    ds = hostile.image_header(32, 32, **{**MARKERS, **values})
    ds.add(DataElement(0x00200052, "UI", BAD_UID))  # Frame of Reference UID
    if pixels:
        rng = np.random.default_rng(seed)
        ds.PixelData = rng.integers(0, 65535, 32 * 32 * frames_of_data, dtype=np.uint16).tobytes()
    else:
        del ds.Rows, ds.Columns
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    return hostile.save(ds)


FILES = {
    f"{NAME}.dcm": (_dicom(1), "scored"),
    f"{NAME}-report.dcm": (_dicom(2, pixels=False, Modality=FORGED_MODALITY), "no_pixel_data"),
    f"{NAME}-photometric.dcm": (_dicom(3, PhotometricInterpretation="Zzmarker Janet"), "unsupported_pixel_format"),
    f"{NAME}-extra-frames.dcm": (_dicom(4, frames_of_data=8), "excess_pixel_data"),
    f"{NAME}-cut.dcm": (_dicom(5)[:-700], "corrupt_dicom"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, here, on writing the hostile values
def test_no_patient_data_in_log_reasons_metrics_or_grpc_errors(make_daemon) -> None:
    metrics_port = free_port()
    d = make_daemon(logging={"level": "DEBUG"}, server={"metrics_port": metrics_port})
    d.start()
    for name, (data, _) in FILES.items():
        drop(d.incoming, name, data)
    results = {r.file_name: r for r in d.collect(len(FILES))}
    for name, (_, expected) in FILES.items():
        r = results[name]
        outcome = "scored" if r.outcome == pb.OUTCOME_SCORED else r.rejection.code
        assert outcome == expected, (name, r.rejection.message)
    with d.channel() as ch:
        scored = pb_grpc.ScoringStub(ch).Score(
            pb.ScoreRequest(image=_dicom(6, pixels=False, Modality=FORGED_MODALITY), file_name=f"{NAME}.dcm"),
            timeout=60,
        )
    assert scored.rejection.code == "no_pixel_data"

    set_aside = len(FILES) - 1 + 1  # the four rejected files, and the rejected Score upload with them
    eventually(
        lambda: list(d.rejected.glob("*.reason.txt")),
        "every rejection's reason set aside",
        until=lambda reasons: len(reasons) >= set_aside,
        timeout=10,
    )
    reasons = [p.read_text() for p in d.rejected.glob("*.reason.txt")]
    assert len(reasons) == set_aside
    messages = [r.rejection.message for r in results.values()] + [scored.rejection.message]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert d.stop() == 0
    log = d.log()
    for where, text in {
        "log": log,
        "reasons": "\n".join(reasons),
        "metrics": metrics,
        "grpc": "\n".join(messages),
    }.items():
        for marker in LEAKS:
            assert marker not in text, f"{marker!r} in the {where}:\n" + "\n".join(
                line for line in text.splitlines() if marker in line
            )
    # Every line is one of ours, with its own level; none starts with a level a header value put there.
    for line in log.splitlines():
        assert not re.match(rf"\S+ \S+ {LEVELS} appliance patient", line), line
        assert not re.match(r"^\S+ \S+ CRITICAL", line), line


ANONYMISED = "CQ500-CT-310"  # one component with digits, as anonymisers leave names and IDs: highdicom quotes them


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and highdicom, here, in the test's own process
def test_an_anonymised_name_stays_out_of_the_log_while_its_report_and_overlay_are_made(
    make_daemon, tmp_path: Path
) -> None:
    """The daemon at DEBUG receives an anonymised CT by C-STORE and sends its report and heatmap overlay to a real
    Orthanc: highdicom warns about the name while making both, and the log says so without the name."""
    require("Orthanc")
    require("storescu")
    source = anonymised_ct(tmp_path / "cq500.dcm")
    with Orthanc(tmp_path / "pacs", ae_title="PACS", modalities={"appliance": RemoteAe(APPLIANCE)}) as pacs:
        d, port = _appliance(make_daemon, pacs, logging={"level": "DEBUG"})
        storescu([source], "127.0.0.1", port, SCANNER, APPLIANCE)
        (result,) = d.collect(1)
        assert result.outcome == pb.OUTCOME_SCORED and result.HasField("heatmap")
        pacs.wait_for_instances(2, timeout=90)
        _until("both objects delivered", lambda: d.status().outbox_pending == 0, d)
        assert d.stop() == 0
        held = [pacs.tags(i) for i in pacs.instances()]
    assert sorted(tags["PatientName"] for tags in held) == [ANONYMISED] * 2  # the PACS has it; the log must not
    log = d.log()
    assert "a UserWarning from highdicom" in log  # it warned, and the log says where from
    for marker in (ANONYMISED, "CQ500", "CT-310"):
        assert marker not in log, "\n".join(line for line in log.splitlines() if marker in line)
