"""The DICOM pixel pipeline against values computed independently from the files' own attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.errors import MultiFrameRejected
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits
from appliance.manifest import Preprocess

VOI = Preprocess()
MIN_MAX = Preprocess(dicom_window="min_max")


def _path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path))


def _decode(name: str, preprocess: Preprocess = VOI, limits: DecodeLimits | None = None) -> DecodedImage:
    return decode(_path(name).read_bytes(), limits=limits or DecodeLimits(), preprocess=preprocess)


@pytest.fixture(scope="module")
def cr_uncompressed() -> DecodedImage:
    return _decode("RG1_UNCR.dcm")


def test_monochrome1_comes_out_inverted(cr_uncompressed: DecodedImage) -> None:
    ds = pydicom.dcmread(_path("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array
    out = cr_uncompressed.frames[0]
    assert out.shape == raw.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Higher stored values are brighter attenuation in MONOCHROME1, so they must come out darker.
    assert out.flat[raw.argmax()] == pytest.approx(out.min(), abs=1e-6)
    assert out.flat[raw.argmin()] == pytest.approx(out.max(), abs=1e-6)
    sample = np.random.default_rng(0).choice(raw.size, 5000, replace=False)
    assert np.corrcoef(raw.flat[sample], out.flat[sample])[0, 1] < -0.9


def test_window_center_width_gives_the_dicom_linear_formula() -> None:
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    x = ds.pixel_array.astype(np.float64) * slope + intercept
    # PS3.3 C.11.2.1.2.1, mapped to 0..1
    c, w = center - 0.5, width - 1
    expected = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    expected[x <= c - w / 2] = 0.0
    expected[x > c + w / 2] = 1.0
    out = _decode("MR_small.dcm").frames[0]
    assert np.allclose(out, expected, atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_rescale_without_window_uses_the_full_hounsfield_range() -> None:
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    assert "WindowCenter" not in ds or ds.WindowCenter is None
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = _decode("CT_small.dcm").frames[0]
    assert np.allclose(out, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_min_max_policy_ignores_the_window() -> None:
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    out = _decode("MR_small.dcm", MIN_MAX).frames[0]
    assert np.allclose(out, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


@pytest.mark.parametrize("twin", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_syntaxes_decode_to_the_same_pixels(twin: str) -> None:
    assert np.array_equal(_decode("MR_small.dcm").frames[0], _decode(twin).frames[0])


def test_jpeg2000_radiograph_matches_its_uncompressed_twin(cr_uncompressed: DecodedImage) -> None:
    j2k = _decode("RG1_J2KR.dcm")
    assert j2k.meta.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert np.array_equal(j2k.frames[0], cr_uncompressed.frames[0])


def test_ybr_jpeg_becomes_rgb() -> None:
    reference = _decode("SC_rgb.dcm").frames[0]  # uncompressed RGB
    jpeg = _decode("SC_rgb_jpeg_dcmtk.dcm")  # the same picture as YBR_FULL_422 JPEG baseline
    assert jpeg.meta.photometric.startswith("YBR")
    assert jpeg.frames[0].shape == reference.shape == (100, 100, 3)
    assert np.abs(jpeg.frames[0] - reference).mean() < 0.02
    # The top band of SC_rgb is pure red: R high, G and B low after conversion.
    r, g, b = jpeg.frames[0][2, 50]
    assert r > 0.9 and g < 0.1 and b < 0.1


def test_multiframe_per_frame_or_rejected() -> None:
    img = _decode("emri_small.dcm")
    assert len(img.frames) == 10 and img.original_frame_count == 10
    assert all(f.shape == (64, 64) for f in img.frames)
    with pytest.raises(MultiFrameRejected):
        _decode("emri_small.dcm", limits=DecodeLimits(multiframe="reject"))


def test_identifiers_are_read() -> None:
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    meta = _decode("CT_small.dcm").meta
    assert meta.sop_instance_uid == ds.SOPInstanceUID and meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.modality == "CT" and meta.source_format == "dicom"
