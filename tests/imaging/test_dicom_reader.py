"""The DICOM pixel pipeline on real files, against values computed independently from the files' own attributes."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.domain.errors import ImageTooLarge, MultiFrameRejected
from appliance.domain.manifest import Preprocess
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits

VOI = Preprocess()
MIN_MAX = Preprocess(dicom_window="min_max")


def _path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is missing from pydicom's test data"
    return Path(str(path))


def _dataset(name: str) -> Dataset:
    return pydicom.dcmread(_path(name))


def _decode(name: str, preprocess: Preprocess = VOI, limits: DecodeLimits | None = None) -> DecodedImage:
    return decode(_path(name).read_bytes(), limits=limits or DecodeLimits(), preprocess=preprocess)


def _decode_dataset(ds: Dataset, preprocess: Preprocess = VOI) -> DecodedImage:
    buf = io.BytesIO()
    ds.save_as(buf)
    return decode(buf.getvalue(), limits=DecodeLimits(), preprocess=preprocess)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), with the output range written as 0..1."""
    c, w = center - 0.5, width - 1.0
    inside = (x - c) / w + 0.5
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, inside))


def _first(value: Any) -> float:
    """The first of a possibly multi-valued DS attribute."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _assert_display_frame(frame: np.ndarray, shape: tuple[int, ...]) -> None:
    assert frame.shape == shape and frame.dtype == np.float32
    assert float(frame.min()) >= 0.0 and float(frame.max()) <= 1.0


@pytest.fixture(scope="module")
def radiograph() -> tuple[np.ndarray, DecodedImage]:
    """RG1_UNCI.dcm (CR, MONOCHROME1, 1955x1841): its stored values and its decoding, made once."""
    return _dataset("RG1_UNCI.dcm").pixel_array, _decode("RG1_UNCI.dcm")


# --- grayscale: modality LUT, VOI, MONOCHROME1 ------------------------------------------------------


def test_monochrome1_comes_out_inverted(radiograph: tuple[np.ndarray, DecodedImage]) -> None:
    raw, image = radiograph
    assert image.meta.photometric == "MONOCHROME1"
    out = image.frames[0]
    _assert_display_frame(out, raw.shape)
    # The highest stored value is the brightest on film in MONOCHROME1, so the darkest display value here.
    assert out.flat[raw.argmax()] == out.min()
    assert out.flat[raw.argmin()] == out.max()
    sample = np.random.default_rng(0).choice(raw.size, 5000, replace=False)
    assert np.corrcoef(raw.flat[sample], out.flat[sample])[0, 1] < -0.99
    # ... and exactly one minus the file's window (15000/30000), computed here from the formula.
    ds = _dataset("RG1_UNCI.dcm")
    expected = 1.0 - _linear_window(raw.flat[sample].astype(np.float64), ds.WindowCenter, ds.WindowWidth)
    assert np.allclose(out.flat[sample], expected, atol=1e-6)


def test_window_maps_its_edges_exactly_to_0_and_1() -> None:
    """A CT ramp from -300 to +300 HU through rescale (intercept -1024) and a 40/400 window."""
    ds = _dataset("CT_small.dcm")
    hu = np.arange(-300, 301)
    stored = np.full((ds.Rows, ds.Columns), 1024, dtype=np.int16)
    stored.flat[: hu.size] = hu - int(ds.RescaleIntercept)
    ds.PixelData = stored.tobytes()
    ds.WindowCenter, ds.WindowWidth = 40, 400
    out = _decode_dataset(ds).frames[0].ravel()[: hu.size].astype(np.float64)
    lower, upper = 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2  # -160 and 239 HU
    assert np.all(out[hu <= lower] == 0.0)
    assert np.all(out[hu >= upper] == 1.0)
    assert 0.0 < out[hu == lower + 1][0] < 0.01
    assert np.allclose(out, _linear_window(hu.astype(np.float64), 40, 400), atol=1e-6)
    assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # signed 16 bit, window 600/1600, no rescale
        "693_UNCR.dcm",  # CT: rescale -1024, window 40/100, 14 bits stored
        "MR2_UNCR.dcm",  # rescale slope 3.77, window 1000/2000, 12 bits stored
        "MR-SIEMENS-DICOM-WithOverlays.dcm",  # two windows: the first one is used
    ],
)
def test_rescale_and_first_window_follow_the_dicom_formula(name: str) -> None:
    ds = _dataset(name)
    x = ds.pixel_array * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    expected = _linear_window(x, _first(ds.WindowCenter), _first(ds.WindowWidth))
    out = _decode(name).frames[0]
    _assert_display_frame(out, x.shape)
    assert np.allclose(out, expected, atol=2e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions_span_0_to_1(function: str) -> None:
    ds = _dataset("MR_small.dcm")
    ds.VOILUTFunction = function
    x = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        expected = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    else:  # PS3.3 C.11.2.1.3.2
        expected = np.clip((x - (c - w / 2)) / w, 0.0, 1.0)
    assert np.allclose(_decode_dataset(ds).frames[0], expected, atol=2e-6)


def test_window_output_does_not_depend_on_bits_stored() -> None:
    # pydicom's windowing output range follows Bits Stored (14 in the one, 16 in the other); ours must not.
    uncompressed, j2k = _decode("693_UNCR.dcm").frames[0], _decode("693_J2KR.dcm").frames[0]
    assert _dataset("693_UNCR.dcm").BitsStored != _dataset("693_J2KR.dcm").BitsStored
    assert np.allclose(uncompressed, j2k, atol=1e-6)


def test_enhanced_ct_takes_rescale_and_window_from_its_functional_groups() -> None:
    ds = _dataset("eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale, window = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    assert "WindowCenter" not in ds and "RescaleIntercept" not in ds
    image = _decode("eCT_Supplemental.dcm")
    assert len(image.frames) == 2
    for stored, out in zip(ds.pixel_array, image.frames, strict=True):
        hu = stored * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
        assert np.allclose(out, _linear_window(hu, float(window.WindowCenter), float(window.WindowWidth)), atol=2e-6)


def test_a_frame_own_window_overrides_the_shared_one() -> None:
    ds = _dataset("eCT_Supplemental.dcm")
    item = Dataset()
    item.WindowCenter, item.WindowWidth = 300, 1500
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = [item]
    rescale = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array[1] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    frames = _decode_dataset(ds).frames
    assert np.allclose(frames[1], _linear_window(hu, 300, 1500), atol=2e-6)
    assert np.array_equal(frames[0], _decode("eCT_Supplemental.dcm").frames[0])


def test_voi_lut_sequence_is_preferred_and_its_output_range_is_0_1() -> None:
    ds = _dataset("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    entries, first, _bits = item.LUTDescriptor
    table = np.asarray(item.LUTData, dtype=np.float64)
    assert table.size == entries
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = (table[index] - table.min()) / (table.max() - table.min())
    out = _decode("vlut_04.dcm").frames[0]
    _assert_display_frame(out, ds.pixel_array.shape)
    assert np.allclose(out, expected, atol=1e-6)


def test_modality_lut_sequence_is_applied_before_min_max() -> None:
    ds = _dataset("mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    entries, first, _bits = item.LUTDescriptor
    table = np.asarray(item.LUTData, dtype=np.float64)
    values = table[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)]
    expected = (values - values.min()) / (values.max() - values.min())
    assert np.allclose(_decode("mlut_18.dcm").frames[0], expected, atol=1e-6)


def test_without_a_window_the_rescaled_range_is_stretched() -> None:
    ds = _dataset("CT_small.dcm")
    assert ds.get("WindowCenter") is None
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = _decode("CT_small.dcm").frames[0]
    assert np.allclose(out, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


def test_min_max_policy_ignores_the_window() -> None:
    raw = _dataset("MR_small.dcm").pixel_array.astype(np.float64)
    out = _decode("MR_small.dcm", MIN_MAX).frames[0]
    assert np.allclose(out, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


@pytest.mark.parametrize("center, width", [(None, None), (600, 0)], ids=["empty window", "zero width"])
def test_an_unusable_window_falls_back_to_min_max(center: int | None, width: int | None) -> None:
    ds = _dataset("MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth = center, width
    raw = ds.pixel_array.astype(np.float64)
    out = _decode_dataset(ds).frames[0]
    assert np.allclose(out, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_float_pixel_data_is_stretched_and_nan_becomes_0() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.30", generate_uid()  # Parametric Map
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 2, 3, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = np.array([[0, 1, 2], [3, np.nan, 5]], dtype="<f4").tobytes()
    out = _decode_dataset(ds).frames[0]
    assert np.allclose(out, [[0, 0.2, 0.4], [0.6, 0, 1]], atol=1e-7)


def test_peak_memory_stays_near_the_output_size(radiograph: tuple[np.ndarray, DecodedImage]) -> None:
    data = _path("RG1_UNCI.dcm").read_bytes()
    tracemalloc.start()
    try:
        image = decode(data, limits=DecodeLimits(), preprocess=VOI)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Parsed pixel bytes, the stored array and the float32 result are ~2x the output; one full-size
    # float64 copy more would add another 2x.
    assert peak < 3 * image.frames[0].nbytes, f"peak {peak / 2**20:.0f} MiB"
    assert np.array_equal(image.frames[0], radiograph[1].frames[0])


# --- compressed transfer syntaxes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, twin",
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
        ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
        ("SC_rgb_16bit.dcm", "SC_rgb_rle_16bit.dcm"),
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # YBR_RCT colour transform in JPEG 2000
    ],
)
def test_lossless_syntaxes_decode_to_the_same_pixels(reference: str, twin: str) -> None:
    expected, actual = _decode(reference), _decode(twin)
    assert actual.meta.transfer_syntax != expected.meta.transfer_syntax
    assert len(actual.frames) == len(expected.frames)
    for a, b in zip(expected.frames, actual.frames, strict=True):
        _assert_display_frame(b, a.shape)
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "reference, j2k, syntax",
    [
        # In the WG04 set UNCR is the reversible (J2KR) image uncompressed, and UNCI the irreversible
        # (J2KI) one after its loss: RG1_UNCI differs from RG1_J2KR by up to 403 stored values.
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
        ("RG1_UNCI.dcm", "RG1_J2KI.dcm", "JPEG 2000 Image Compression"),
    ],
)
def test_jpeg2000_radiograph_matches_its_uncompressed_twin(reference: str, j2k: str, syntax: str) -> None:
    compressed = _decode(j2k)
    assert compressed.meta.transfer_syntax == syntax and compressed.meta.photometric == "MONOCHROME1"
    assert np.array_equal(compressed.frames[0], _decode(reference).frames[0])


@pytest.mark.parametrize("reference, lossy", [("MR2_UNCR.dcm", "MR2_J2KI.dcm"), ("JPEG-LL.dcm", "JPGExtended.dcm")])
def test_lossy_syntaxes_decode_close_to_the_original(reference: str, lossy: str) -> None:
    # JPGExtended.dcm is 12-bit JPEG Extended (process 4); JPEG-LL.dcm is the same NM image, lossless.
    expected, actual = _decode(reference).frames[0], _decode(lossy).frames[0]
    _assert_display_frame(actual, expected.shape)
    assert np.abs(actual - expected).mean() < 0.01


# --- colour -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL, JPEG baseline
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # YBR_FULL_422, JPEG baseline
        "SC_rgb_dcmtk_+eb+cy+s4.dcm",
        "SC_rgb_dcmtk_+eb+cr.dcm",  # RGB inside the JPEG
        "SC_ybr_full_uncompressed.dcm",
    ],
)
def test_ybr_and_jpeg_colour_become_rgb(name: str) -> None:
    reference = _decode("SC_rgb.dcm").frames[0]  # uncompressed RGB
    image = _decode(name)
    assert image.meta.photometric == _dataset(name).PhotometricInterpretation
    _assert_display_frame(image.frames[0], (100, 100, 3))
    assert np.abs(image.frames[0] - reference).mean() < 0.02
    # The top band of SC_rgb is pure red: R high, G and B low after conversion.
    r, g, b = image.frames[0][2, 50]
    assert r > 0.9 and g < 0.1 and b < 0.1


def test_rgb_of_16_and_32_bits_scales_by_bits_stored() -> None:
    reference = _decode("SC_rgb.dcm").frames[0]
    for name in ("SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm"):
        assert np.allclose(_decode(name).frames[0], reference, atol=1e-6), name


def test_multiframe_ybr_jpeg_gives_every_frame_in_rgb() -> None:
    image = _decode("color3d_jpeg_baseline.dcm")
    assert image.meta.photometric == "YBR_FULL_422"
    assert len(image.frames) == image.original_frame_count == 120
    frame = image.frames[60]
    _assert_display_frame(frame, (480, 640, 3))
    # The 61st frame as pydicom's own reference converts it, and as it is stored (YBR): ours is the former.
    rgb = pixel_array(_path("color3d_jpeg_baseline.dcm"), index=60) / 255.0
    ybr = pixel_array(_path("color3d_jpeg_baseline.dcm"), index=60, raw=True) / 255.0
    assert np.allclose(frame, rgb, atol=1e-6)
    assert np.abs(frame - ybr).max() > 0.3


def test_palette_colour_goes_through_its_lookup_tables() -> None:
    ds = _dataset("OBXXXX1A.dcm")
    entries, first, bits = ds.RedPaletteColorLookupTableDescriptor
    assert bits == 16
    tables = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") for c in ("Red", "Green", "Blue")]
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    top = 255.0 if max(int(t.max()) for t in tables) <= 255 else 65535.0
    expected = np.stack([t[index] / top for t in tables], axis=-1)
    image = _decode("OBXXXX1A.dcm")
    _assert_display_frame(image.frames[0], (*ds.pixel_array.shape, 3))
    assert np.allclose(image.frames[0], expected, atol=1e-6)


def test_segmented_16_bit_palette_uses_the_full_range() -> None:
    out = _decode("gdcm-US-ALOKA-16.dcm").frames[0]
    _assert_display_frame(out, (480, 640, 3))
    assert out.max() > 0.9  # its table holds 16-bit values; dividing by 255 would clip, by its max would lie


# --- framing, identity and the file's envelope --------------------------------------------------


def test_dicom_without_preamble_is_read() -> None:
    data = _path("MR_small.dcm").read_bytes()
    bare = decode(data[132:], limits=DecodeLimits(), preprocess=VOI)  # no preamble, no 'DICM'
    assert np.array_equal(bare.frames[0], _decode("MR_small.dcm").frames[0])
    # An old file with no file meta at all: implicit VR, syntax inferred from the encoding.
    face = _decode("OT-PAL-8-face.dcm")
    assert face.meta.transfer_syntax == "Implicit VR Little Endian"
    _assert_display_frame(face.frames[0], (480, 640, 3))


def test_multiframe_per_frame_or_rejected() -> None:
    image = _decode("emri_small.dcm")
    assert len(image.frames) == image.original_frame_count == 10
    for frame in image.frames:
        _assert_display_frame(frame, (64, 64))
    assert not np.array_equal(image.frames[0], image.frames[9])
    with pytest.raises(MultiFrameRejected) as rejected:
        _decode("emri_small.dcm", limits=DecodeLimits(multiframe="reject"))
    assert rejected.value.code == "multiframe_rejected"
    with pytest.raises(ImageTooLarge):
        _decode("emri_small.dcm", limits=DecodeLimits(max_frames=9))
    single = _decode("MR_small.dcm", limits=DecodeLimits(multiframe="reject"))
    assert len(single.frames) == 1


def test_identifiers_are_read() -> None:
    ds = _dataset("CT_small.dcm")
    meta = _decode("CT_small.dcm").meta
    assert meta.source_format == "dicom"
    assert meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.series_instance_uid == ds.SeriesInstanceUID
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.accession_number == str(ds.get("AccessionNumber", ""))
    assert meta.modality == "CT"
    assert meta.transfer_syntax == "Explicit VR Little Endian"
    assert meta.photometric == "MONOCHROME2"


def test_colour_frames_count_three_values_per_pixel_against_the_total_limit() -> None:
    # color3d_jpeg_baseline: 120 frames of 480x640 RGB, 36.9 M pixels but 110.6 M values. Under a pixel
    # count it would pass 4 x 10 M; counted as values it is refused.
    with pytest.raises(ImageTooLarge, match="480x3"):
        _decode("color3d_jpeg_baseline.dcm", limits=DecodeLimits(max_pixels=10_000_000))
