"""Heatmap overlays in the PACS, all real: DCMTK's storescu as the scanner, the daemon's DICOM receiver, and a real
Orthanc that ends up holding, for each scored image, its report (Enhanced SR) and its overlay (an RGB Secondary
Capture) that references the image and the report, and that dciodvfy passes as fetched back from Orthanc."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import EnhancedSRStorage, SecondaryCaptureImageStorage, generate_uid

from appliance.v1 import scoring_pb2 as pb
from tests.integration.test_dicom import APPLIANCE, SCANNER, _appliance, _result, _until
from tests.peers import needs, require
from tests.peers.dcmtk import dciodvfy, storescu
from tests.peers.orthanc import Orthanc

pytestmark = needs("Orthanc", "storescu")


def _study(folder: Path) -> dict[str, tuple[int, int]]:
    """Three images of one study: two CT_small (128 x 128) and one large CT-like image (2400 x 1800, windowed, so
    the daemon shrinks it first for the model) with a bright disc; their SOP Instance UIDs and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    sizes = {}
    for n in range(3):
        ds = template.copy()
        if n == 2:
            yy, xx = np.mgrid[0:1800, 0:2400]
            pixels = 100 + 900 * np.exp(-(((yy - 500) ** 2 + (xx - 1700) ** 2) / (2 * 110.0**2)))
            ds.Rows, ds.Columns = 1800, 2400
            ds.PixelData = pixels.astype(np.int16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 500, 1000
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"ct{n:03d}.dcm", enforce_file_format=True)
        sizes[str(ds.SOPInstanceUID)] = (int(ds.Rows), int(ds.Columns))
    return sizes


def _held(pacs: Orthanc) -> dict[str, tuple[bytes, pydicom.Dataset]]:
    """Every instance Orthanc holds, fetched back as a file: by SOP Instance UID, its bytes and dataset."""
    out: dict[str, tuple[bytes, pydicom.Dataset]] = {}
    for orthanc_id in pacs.instances():
        data = pacs.get_bytes(f"/instances/{orthanc_id}/file")
        ds = pydicom.dcmread(io.BytesIO(data))
        out[str(ds.SOPInstanceUID)] = (data, ds)
    return out


def test_a_scanned_image_reaches_the_pacs_with_its_report_and_its_heatmap_overlay(
    make_daemon, pacs: Orthanc, tmp_path: Path
) -> None:
    d, port = _appliance(make_daemon, pacs)
    sizes = _study(tmp_path / "study")
    done = storescu(sorted((tmp_path / "study").iterdir()), "127.0.0.1", port, SCANNER, APPLIANCE)
    results = d.collect(3)
    assert {r.sop_instance_uid for r in results} == set(sizes), done.stdout + done.stderr
    assert all(r.outcome == pb.OUTCOME_SCORED and r.HasField("heatmap") for r in results)
    pacs.wait_for_instances(6, timeout=90)
    _until("every object delivered", lambda: d.status().outbox_pending == 0, d)
    held = _held(pacs)
    assert len(held) == 6  # a report and an overlay per image, each once

    overlays = {
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID: (data, ds)
        for data, ds in held.values()
        if ds.SOPClassUID == SecondaryCaptureImageStorage
    }
    assert set(overlays) == set(sizes)
    for r in results:
        delivery = _result(d, r.sequence).delivery  # the report's, as before overlays
        assert delivery.state == pb.DELIVERY_DELIVERED
        _, report = held[delivery.report_sop_instance_uid]
        assert report.SOPClassUID == EnhancedSRStorage
        _, sc = overlays[r.sop_instance_uid]
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
        assert sc.StudyInstanceUID == report.StudyInstanceUID and sc.SeriesNumber == report.SeriesNumber + 1
        assert sc.SeriesInstanceUID != report.SeriesInstanceUID
        (source,) = sc.SourceImageSequence
        assert source.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        (document,) = sc.ReferencedInstanceSequence
        assert (document.ReferencedSOPClassUID, document.ReferencedSOPInstanceUID) == (
            EnhancedSRStorage,
            delivery.report_sop_instance_uid,
        )
        assert "pipeline-test" in sc.ImageComments and "Not for diagnosis" in sc.ImageComments
        rows, cols = sizes[r.sop_instance_uid]
        # As large as the source up to 1024 px on its longer side: the large one was shrunk first for the model
        # (to 64 px) and, in the same decode, for the overlay.
        k = -(-max(rows, cols) // 1024)  # the least whole factor that brings the longer side to 1024 or under
        assert (sc.Rows, sc.Columns) == (rows // k, cols // k)

    require("dciodvfy")
    (large,) = [uid for uid, size in sizes.items() if size == (1800, 2400)]
    for uid in (large, next(u for u in sizes if u != large)):
        path = tmp_path / f"overlay-{uid}.dcm"
        path.write_bytes(overlays[uid][0])
        rc, errors = dciodvfy(path)
        assert rc == 0 and errors == [], errors


@pytest.mark.parametrize("off", ["heatmaps", "overlays"])
def test_with_heatmaps_or_overlays_off_only_the_report_goes(
    make_daemon, pacs: Orthanc, tmp_path: Path, off: str
) -> None:
    if off == "heatmaps":
        d, port = _appliance(make_daemon, pacs, inference={"heatmaps": False})
    else:
        d, port = _appliance(make_daemon, pacs, pacs_overlays=False)
    sizes = _study(tmp_path / "study")
    storescu([sorted((tmp_path / "study").iterdir())[0]], "127.0.0.1", port, SCANNER, APPLIANCE)
    (result,) = d.collect(1)
    assert result.sop_instance_uid in sizes
    assert result.HasField("heatmap") == (off == "overlays")  # the stream keeps it where only overlays are off
    _until("the report delivered", lambda: _result(d, result.sequence).delivery.state == pb.DELIVERY_DELIVERED, d)
    assert d.status().outbox_pending == 0
    assert [ds.SOPClassUID for _, ds in _held(pacs).values()] == [EnhancedSRStorage]
