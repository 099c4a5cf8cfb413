"""The real peers the DICOM tests use: Orthanc takes what DCMTK sends as the scanner and refuses strangers, keeps
what it stored across a restart and reads an SR back; dciodvfy's verdict comes back as error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    DeviceObserverIdentifyingAttributes,
    EnhancedSR,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tests.peers import INSTALL, missing, needs
from tests.peers.dcmtk import dciodvfy, dcmsend, echoscu, parse_dciodvfy, storescu
from tests.peers.orthanc import Code, ContentItem, Orthanc, RemoteAe, flatten

HOST = "127.0.0.1"


def _testdata(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


CT = _testdata("CT_small.dcm")
MR = _testdata("MR_small.dcm")
# JPEG baseline, RLE, JPEG 2000 and JPEG 2000 lossless, each its own SOP instance.
COMPRESSED = [_testdata(name) for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "MR2_J2KR.dcm")]

pacs = Orthanc.fixture(ae_title="PACS", modalities={"scanner": RemoteAe("SCANNER")})


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@needs("Orthanc", "storescu")
def test_storescu_as_the_scanner_sends_to_orthanc_and_rest_finds_them_by_sop_uid(pacs: Orthanc) -> None:
    sent = storescu([CT, MR], HOST, pacs.dicom_port, "SCANNER", "PACS")

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(pacs.wait_for_instances(2)) == 2
    for path in (CT, MR):
        found = pacs.find_sop(_sop_uid(path))
        assert found is not None
        assert pacs.tags(found)["SOPInstanceUID"] == _sop_uid(path)
    assert pacs.find_sop(generate_uid()) is None


@needs("Orthanc", "storescu", "echoscu")
def test_a_wrong_called_ae_or_an_unknown_caller_is_refused(pacs: Orthanc) -> None:
    wrong_called = storescu([CT], HOST, pacs.dicom_port, "SCANNER", "NOTPACS")
    stranger = echoscu(HOST, pacs.dicom_port, "STRANGER", "PACS")

    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    assert echoscu(HOST, pacs.dicom_port, "SCANNER", "PACS").returncode == 0
    assert pacs.instances() == []


@needs("Orthanc", "storescu")
def test_orthanc_stopped_or_killed_and_restarted_keeps_what_it_stored(pacs: Orthanc) -> None:
    ports = (pacs.dicom_port, pacs.http_port)
    assert storescu([CT], HOST, pacs.dicom_port, "SCANNER", "PACS").returncode == 0

    pacs.stop()
    assert not pacs.running
    pacs.start()
    assert pacs.find_sop(_sop_uid(CT)) is not None
    pacs.kill()
    pacs.start()
    assert storescu([CT, MR], HOST, pacs.dicom_port, "SCANNER", "PACS").returncode == 0

    assert (pacs.dicom_port, pacs.http_port) == ports
    assert {pacs.find_sop(_sop_uid(path)) for path in (CT, MR)} == set(pacs.instances())
    assert len(pacs.instances()) == 2  # the CT sent again is kept once


@needs("Orthanc", "storescu", "dcmsend")
def test_compressed_syntaxes_go_with_storescu_runs_and_with_one_dcmsend(pacs: Orthanc) -> None:
    by_storescu = storescu([CT, *COMPRESSED], HOST, pacs.dicom_port, "SCANNER", "PACS")
    assert by_storescu.returncode == 0, by_storescu.stdout + by_storescu.stderr
    assert len(pacs.wait_for_instances(5)) == 5
    by_dcmsend = dcmsend([MR, *COMPRESSED], HOST, pacs.dicom_port, "SCANNER", "PACS")

    assert by_dcmsend.returncode == 0, by_dcmsend.stdout + by_dcmsend.stderr
    assert {pacs.find_sop(_sop_uid(path)) for path in (CT, MR, *COMPRESSED)} == set(pacs.wait_for_instances(6))


@needs("Orthanc")
def test_orthanc_sends_to_a_node_it_learns_of_while_running(pacs: Orthanc, tmp_path: Path) -> None:
    with Orthanc(tmp_path / "sender", ae_title="SENDER") as sender:
        pacs.add_modality("sender", RemoteAe("SENDER", HOST, sender.dicom_port))
        assert not sender.echo("pacs")  # it does not know the PACS yet
        sender.add_modality("pacs", RemoteAe("PACS", HOST, pacs.dicom_port))
        assert sender.echo("pacs")

        sender.send("pacs", [sender.upload(CT)])

    assert pacs.find_sop(_sop_uid(CT)) is not None
    assert "sender" in pacs.config()["DicomModalities"]  # kept for a restart


@needs("Orthanc", "dcmsend", "dciodvfy")
def test_an_sr_passes_dciodvfy_and_reads_back_from_orthanc_as_content_items(pacs: Orthanc, tmp_path: Path) -> None:
    sr_path = _enhanced_sr(CT, tmp_path / "sr.dcm")
    rc, errors = dciodvfy(sr_path)
    assert (rc, errors) == (0, [])

    assert dcmsend([sr_path], HOST, pacs.dicom_port, "SCANNER", "PACS").returncode == 0
    found = pacs.find_sop(_sop_uid(sr_path))
    assert found is not None
    items = pacs.content_items(found)

    by_name = {item.name.meaning: item for item in items if item.name is not None}
    assert by_name["Finding"].value == Code("36118008", "SCT", "Pneumothorax")
    assert by_name["Pneumothorax"].value == Code("52101004", "SCT", "Present")
    assert by_name["Pneumothorax score"].value == pytest.approx(0.87)
    assert by_name["Pneumothorax score"].unit == Code("1", "UCUM", "no units")
    assert by_name["Algorithm Name"].value == "chest-classifier"
    assert by_name["Source of Measurement"].value == _sop_uid(CT)


@needs("dciodvfy")
def test_dciodvfy_returns_its_error_lines(tmp_path: Path) -> None:
    broken = tmp_path / "no-modality.dcm"
    ct = dcmread(CT)
    del ct.Modality
    ct.save_as(broken)

    assert dciodvfy(CT) == (0, [])  # CT_small has warnings only
    rc, errors = dciodvfy(broken)
    assert rc == 1
    assert errors and all(line.startswith("Error - ") for line in errors)
    assert any("Modality" in line for line in errors)


def test_the_dciodvfy_parser_keeps_the_error_lines_only() -> None:
    output = "CTImage\nWarning - Value is zero\nError - Missing attribute <Modality>\n  Error - Bad value\n"

    assert parse_dciodvfy(output) == ["Error - Missing attribute <Modality>", "Error - Bad value"]


def test_a_missing_peer_is_one_line_naming_the_install() -> None:
    assert missing("no-such-dicom-tool") == f"no-such-dicom-tool missing: {INSTALL}"
    assert missing("sh") is None


def test_sr_content_is_flattened_depth_first_with_codes_and_numbers() -> None:
    content = [
        {
            "ValueType": "CONTAINER",
            "RelationshipType": "CONTAINS",
            "ConceptNameCodeSequence": [{"CodeValue": "125007", "CodingSchemeDesignator": "DCM", "CodeMeaning": "G"}],
            "ContentSequence": [
                {
                    "ValueType": "NUM",
                    "RelationshipType": "CONTAINS",
                    "ConceptNameCodeSequence": [
                        {"LongCodeValue": "score-pneumothorax", "CodingSchemeDesignator": "99X", "CodeMeaning": "S"}
                    ],
                    "MeasuredValueSequence": [
                        {
                            "NumericValue": "0.25",
                            "MeasurementUnitsCodeSequence": [
                                {"CodeValue": "1", "CodingSchemeDesignator": "UCUM", "CodeMeaning": "no units"}
                            ],
                        }
                    ],
                }
            ],
        }
    ]

    assert flatten(content) == [
        ContentItem(0, "CONTAINS", "CONTAINER", Code("125007", "DCM", "G"), None),
        ContentItem(1, "CONTAINS", "NUM", Code("score-pneumothorax", "99X", "S"), 0.25, Code("1", "UCUM", "no units")),
    ]


def _enhanced_sr(source_path: Path, out: Path) -> Path:
    """A small TID 1500 report on one image, as the appliance's results look (one finding, present, a score)."""
    source = dcmread(source_path)
    algorithm = AlgorithmIdentification(name="chest-classifier", version="1.2.0")
    finding = CodedConcept("36118008", "SCT", "Pneumothorax")
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="pneumothorax"),
        algorithm_id=algorithm,
        finding_type=finding,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[QualitativeEvaluation(name=finding, value=CodedConcept("52101004", "SCT", "Present"))],
        measurements=[
            Measurement(
                name=CodedConcept("score", "99TEST", "Pneumothorax score"),
                value=0.87,
                unit=CodedConcept("1", "UCUM", "no units"),
                algorithm_id=algorithm,
            )
        ],
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="appliance"),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=[group],
    )
    sr = EnhancedSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Test",
        is_complete=True,
    )
    sr.save_as(out, enforce_file_format=True)
    return out
