"""A compressed frame's own header must give the DICOM header's sizes: refused with its own code before decoding."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

from appliance.domain.manifest import Preprocess
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits

from . import hostile

MIB = hostile.MIB


def _decode(data: bytes) -> DecodedImage:
    return decode(data, limits=DecodeLimits(), preprocess=Preprocess())


@pytest.mark.parametrize("claimed", [(30000, 30000), (65000, 65000), (64, 65000), (65, 64)])
def test_a_jpeg_claiming_other_sizes_than_its_header_is_refused_before_decoding(claimed: tuple[int, int]) -> None:
    error, peak = hostile.refusal_and_peak(hostile.jpeg_claiming(claimed))
    assert error.code == "codestream_mismatch", error.message
    assert error.message == (
        f"Frame 1's JPEG codestream gives {claimed[1]} x {claimed[0]} pixels, 1 sample per pixel, 8 bits; "
        "the DICOM header gives 64 x 64 pixels, 1 sample per pixel, 8 bits allocated."
    )
    assert peak < 4 * MIB  # before: libjpeg, then Pillow, allocated gigabytes


def test_a_decoy_sof_behind_a_broken_marker_chain_is_not_believed() -> None:
    error, _ = hostile.refusal_and_peak(hostile.jpeg_decoy((30000, 30000)))
    assert error.code == "corrupt_dicom"
    assert error.message == "Frame 1's JPEG codestream header could not be read."


@pytest.mark.parametrize(
    ("syntax", "label"),
    [
        (JPEGLSLossless, "JPEG-LS codestream"),
        (JPEG2000Lossless, "JPEG 2000 codestream"),
        (JPEG2000, "JPEG 2000 codestream"),
    ],
    ids=["jpeg-ls", "j2k-lossless", "j2k"],
)
def test_jpeg_ls_and_jpeg_2000_claiming_other_sizes_are_refused(syntax: str, label: str) -> None:
    honest = _decode(hostile.compressed_claiming(syntax, None))
    assert honest.frames[0].shape == (64, 64)
    error, peak = hostile.refusal_and_peak(hostile.compressed_claiming(syntax, (40000, 40000)))
    assert error.code == "codestream_mismatch", error.message
    assert error.message.startswith(f"Frame 1's {label} gives 40000 x 40000 pixels, 1 sample per pixel")
    assert peak < 4 * MIB


def test_an_rle_frame_with_other_segments_than_samples_and_bits_call_for_is_refused() -> None:
    honest = _decode(hostile.compressed_claiming(RLELossless, None))
    assert honest.frames[0].shape == (64, 64)
    error, _ = hostile.refusal_and_peak(
        hostile.compressed_claiming(RLELossless, (3, 0))
    )  # 3 segments; 16-bit gray needs 2
    assert error.code == "codestream_mismatch"
    assert "RLE header gives 64 x 64 pixels, 1 sample per pixel, 24 bits" in error.message


def test_fill_bytes_before_markers_are_read_past() -> None:
    """0xFF fill bytes are legal before any marker; libjpeg skips them and so does the check."""
    image = _decode(hostile.jpeg_claiming((64, 64), fill=True))
    assert image.frames[0].shape == (64, 64) and np.isfinite(image.frames[0]).all()
