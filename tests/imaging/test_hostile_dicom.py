"""Hostile DICOM files: refused with their own code, using memory in proportion to what the header declares."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.domain.errors import InputRejected
from appliance.domain.manifest import Preprocess
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits
from appliance.privacy import INVALID, header_value

from . import hostile

MIB = hostile.MIB


def _decode(data: bytes, limits: DecodeLimits | None = None) -> DecodedImage:
    return decode(data, limits=limits or DecodeLimits(), preprocess=Preprocess())


# name: (the file, its code, the most memory its rejection may take). Before the bounds, the deflated
# bomb took 1.6 GiB here (4.9 GB RSS for a 1.2 MB variant) and the others decoded every frame their
# pixel data held: 8,192 frames (over 250 MiB of float32) for 64 MiB under a one-frame header.
BOMBS: dict[str, tuple[Callable[[], bytes], str, int]] = {
    "deflated 64x64 header over 512 MiB of zeros": (
        lambda: hostile.deflate_bomb(512 * MIB),
        "inflates_too_large",
        40 * MIB,
    ),
    "64 MiB of pixel data under a one-frame 64x64 header": (
        lambda: hostile.native(64, 64, None, 64 * MIB),
        "excess_pixel_data",
        80 * MIB,  # pydicom's copy of the Pixel Data: in proportion to the file, never to its frames
    ),
    "64 MiB of pixel data under a two-frame header": (
        lambda: hostile.native(64, 64, 2, 64 * MIB),
        "excess_pixel_data",
        80 * MIB,
    ),
    "RLE with 5000 fragments under a two-frame header": (
        lambda: hostile.rle_fragments(2, 5000),
        "excess_pixel_data",
        80 * MIB,
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(BOMBS), ids=list(BOMBS))
def test_bombs_are_refused_with_their_code_in_bounded_memory(name: str) -> None:
    make, code, most = BOMBS[name]
    data = make()
    error, peak = hostile.refusal_and_peak(data)
    assert error.code == code, error.message
    assert error.message.endswith(".") and "\n" not in error.message
    assert peak < most, f"peak {peak / MIB:.0f} MiB for a {len(data) / MIB:.1f} MiB file"


def test_a_deflated_bomb_past_the_file_size_limit_is_refused_before_its_header_says_more() -> None:
    limits = DecodeLimits(max_file_bytes=1 * MIB)
    with pytest.raises(InputRejected) as err:
        _decode(hostile.deflate_bomb(64 * MIB), limits)
    assert err.value.code == "inflates_too_large"


def test_a_deflated_header_too_large_for_the_limits_is_refused_before_inflating_its_pixels() -> None:
    error, peak = hostile.refusal_and_peak(hostile.deflate_bomb(64 * MIB, rows=60_000, cols=60_000))
    assert error.code == "image_too_large"
    assert peak < 40 * MIB


@pytest.mark.parametrize("frames", [None, 3])
def test_honest_deflated_and_native_files_still_decode(frames: int | None) -> None:
    ds = hostile.image_header(32, 48, frames)
    count = frames or 1
    pixels = np.arange(32 * 48 * count, dtype=np.uint16).reshape(count, 32, 48)
    ds.PixelData = pixels.tobytes()
    for data in (hostile.deflated(ds), hostile.save(ds)):
        image = _decode(data)
        assert len(image.frames) == count
        assert image.frames[-1].shape == (32, 48)
        assert image.frames[-1][0, 0] == 0.0 and image.frames[-1][-1, -1] == 1.0


def test_pydicoms_deflated_sample_reads_as_pydicom_reads_it() -> None:
    path = Path(str(get_testdata_file("image_dfl.dcm", download=False)))
    data = path.read_bytes()
    image = _decode(data)
    reference = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert image.frames[0].shape == reference.shape
    assert image.meta.transfer_syntax == "Deflated Explicit VR Little Endian"


def test_a_cut_deflate_stream_is_corrupt() -> None:
    ds = hostile.image_header(32, 32)
    ds.PixelData = np.random.default_rng(3).integers(0, 4096, 32 * 32, dtype=np.uint16).tobytes()
    data = hostile.deflated(ds)
    with pytest.raises(InputRejected) as err:
        _decode(data[: len(data) - 200])
    assert err.value.code == "corrupt_dicom"


def test_pixel_data_shorter_than_declared_is_corrupt() -> None:
    with pytest.raises(InputRejected) as err:
        _decode(hostile.native(64, 64, 4, 64 * 64 * 2 * 3))
    assert err.value.code == "corrupt_dicom" and "fewer than" in err.value.message


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom says it drops the padding
def test_padding_short_of_a_frame_is_tolerated() -> None:
    image = _decode(hostile.native(64, 64, 2, 64 * 64 * 2 * 2 + 512))
    assert len(image.frames) == 2


FORGED = "OT\n2026-01-01 00:00:00 CRITICAL appliance patient Doe^Jane"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"Modality": FORGED}, "no_pixel_data"),
        ({"Modality": "DOE JANE"}, "no_pixel_data"),
        ({"PhotometricInterpretation": "Doe^Jane"}, "unsupported_pixel_format"),
        ({"PhotometricInterpretation": "DOE JANE"}, "unsupported_pixel_format"),
    ],
)
def test_header_values_in_messages_are_only_valid_harmless_ones(values: dict[str, str], code: str) -> None:
    ds = hostile.image_header(16, 16, **values)
    if code != "no_pixel_data":
        ds.PixelData = bytes(16 * 16 * 2)
    else:
        del ds.Rows, ds.Columns
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    with pytest.raises(InputRejected) as err:
        _decode(hostile.save(ds))
    assert err.value.code == code
    assert INVALID in err.value.message
    assert "Doe" not in err.value.message.title() and "\n" not in err.value.message


@pytest.mark.parametrize(
    ("keyword", "value", "shown"),
    [
        ("Modality", "CT", "CT"),
        ("Modality", "ct ", "ct"),
        ("Modality", "JANE", INVALID),
        ("Modality", "OT\nCRITICAL", INVALID),
        ("PhotometricInterpretation", "YBR_FULL_422", "YBR_FULL_422"),
        ("PhotometricInterpretation", "Doe^Jane", INVALID),
        ("TransferSyntaxUID", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100"),
        ("TransferSyntaxUID", "1.2.DOE", INVALID),
        ("TransferSyntaxUID", "1." * 60 + "1", INVALID),
        ("PatientName", "DOE", INVALID),
        ("AccessionNumber", "A1234", INVALID),
        ("Modality", "", "(missing)"),
        ("Modality", None, "(missing)"),
    ],
)
def test_header_value(keyword: str, value: object, shown: str) -> None:
    assert header_value(keyword, value) == shown
