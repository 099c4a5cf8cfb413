"""`appliance-client overlay` against the real daemon: a stored result's heatmap drawn over the image it was made
from, found by sequence or SOP Instance UID; another image, a rejected result and a result without a heatmap are
each refused with one sentence and a non-zero exit."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.api import client
from appliance.api.codec import heatmap_from_message
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

SIZE = 160


def disc_png(x: float, y: float, radius: float = 16.0) -> bytes:
    """A soft bright disc on a textured background, the finding pipeline-test was trained on."""
    rng = np.random.default_rng(int(x * 1000 + y))
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    background = cv2.GaussianBlur(rng.normal(0.0, 1.0, (SIZE, SIZE)), (0, 0), 4.0)
    image = 0.35 + 0.05 * background / background.std()
    image += 0.5 / (1.0 + np.exp((np.hypot(yy - y, xx - x) - radius) / 2.0))
    return cv2.imencode(".png", np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))[1].tobytes()


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run_client(target: str, *args: str) -> int:
    return client.main(["--target", target, *args])


def test_overlay_of_a_stored_result(make_daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_daemon()
    d.start()
    image = tmp_path / "disc.png"
    image.write_bytes(disc_png(110.0, 45.0))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        scored = stub.Score(pb.ScoreRequest(image=image.read_bytes(), file_name="disc.png"), timeout=60)
        stub.Score(pb.ScoreRequest(image=dicom_bytes(mr), file_name="mr.dcm"), timeout=60)
        bad = stub.Score(pb.ScoreRequest(image=b"not an image at all", file_name="x.bin"), timeout=60)
    assert scored.outcome == pb.OUTCOME_SCORED and scored.HasField("heatmap"), d.log()[-3000:]
    assert bad.outcome == pb.OUTCOME_REJECTED

    # The result's line says where the model looked, in the image's pixels.
    assert run_client(d.target, "get", "--sequence", str(scored.sequence)) == 0
    line = capsys.readouterr().out
    x, y = heatmap_from_message(scored.heatmap).peak
    assert f"; looked at ({x:.0f}, {y:.0f}) for lesion" in line
    assert np.hypot(x - 110.0, y - 45.0) <= 16.0 + SIZE / 8  # within a grid cell of the disc

    out = tmp_path / "overlay.png"
    rc = run_client(d.target, "overlay", "--sequence", str(scored.sequence), "--image", str(image), "-o", str(out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"wrote {out}: disc.png, looked at ({x:.0f}, {y:.0f}) for lesion" in captured.out
    overlay = cv2.imread(str(out))
    assert overlay.shape == (SIZE, SIZE, 3)
    tint = overlay.max(axis=2).astype(np.int32) - overlay.min(axis=2)
    peak_y, peak_x = np.unravel_index(int(np.argmax(tint)), tint.shape)
    assert np.hypot(peak_x - 110.0, peak_y - 45.0) <= 16.0
    assert tint[SIZE - 30 :, :30].max() == 0  # far from the disc the image is as it was

    # By SOP Instance UID, from a copy the PACS has re-encoded: other bytes, the same instance.
    elsewhere = mr.copy()
    elsewhere.InstitutionName = "Re-encoded by the PACS"
    copy = tmp_path / "from-pacs.dcm"
    copy.write_bytes(dicom_bytes(elsewhere))
    out_mr = tmp_path / "mr.png"
    args = ["overlay", "--sop-instance-uid", mr.SOPInstanceUID, "--image", str(copy), "-o", str(out_mr)]
    assert run_client(d.target, *args) == 0, capsys.readouterr().err
    assert cv2.imread(str(out_mr)).shape == (mr.Rows, mr.Columns, 3)
    capsys.readouterr()

    # Another image of the same size: refused, nothing written.
    other = tmp_path / "other.png"
    other.write_bytes(disc_png(40.0, 120.0))
    refused = tmp_path / "refused.png"
    rc = run_client(d.target, "overlay", "--sequence", str(scored.sequence), "--image", str(other), "-o", str(refused))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"other.png is not the image result #{scored.sequence} was made from: its content differs." in err
    assert not refused.exists()

    # The same instance with other pixels (cropped, say): the heatmap's extent does not fit it.
    cropped = mr.copy()
    cropped.PixelData = np.ascontiguousarray(mr.pixel_array[:32, :40]).tobytes()
    cropped.Rows, cropped.Columns = 32, 40
    crop_file = tmp_path / "cropped.dcm"
    crop_file.write_bytes(dicom_bytes(cropped))
    args = ["overlay", "--sop-uid", mr.SOPInstanceUID, "--image", str(crop_file), "-o", str(refused)]
    assert run_client(d.target, *args) == 1
    assert "cropped.dcm is 40 x 32 pixels; result #" in capsys.readouterr().err
    assert not refused.exists()

    # A rejected result has no heatmap to draw.
    rc = run_client(d.target, "overlay", "--sequence", str(bad.sequence), "--image", str(image), "-o", str(refused))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"result #{bad.sequence} (x.bin) was rejected (" in err and "so it has no heatmap." in err

    # Heatmaps turned off: the result says nothing of where the model looked, and the overlay says why not.
    d.stop()
    d.overrides["inference"] = {"heatmaps": False}
    d.start()
    plain = tmp_path / "plain.png"
    plain.write_bytes(disc_png(60.0, 90.0))
    with d.channel() as ch:
        without = pb_grpc.ScoringStub(ch).Score(
            pb.ScoreRequest(image=plain.read_bytes(), file_name="p.png"), timeout=60
        )
    assert without.outcome == pb.OUTCOME_SCORED and not without.HasField("heatmap")
    assert "looked at" not in client.format_result(without)
    rc = run_client(d.target, "overlay", "--sequence", str(without.sequence), "--image", str(plain), "-o", str(refused))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"result #{without.sequence} (p.png) has no heatmap: its model (pipeline-test 1.0.0) declares none" in err
    assert "(inference.heatmaps = false)" in err
    assert not refused.exists()
