"""Each kind of bad input gets its own stable reason code from the reader (table-driven, real bytes)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from appliance.errors import InputRejected
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits
from appliance.manifest import Preprocess


def _file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


def _resaved(name: str, **changes: object) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    for key, value in changes.items():
        if key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8))
    assert ok
    return buf.tobytes()


CASES = {
    "zero bytes": (b"", "empty_file"),
    "text": (b"just some notes\n" * 10, "unsupported_format"),
    "pdf": (b"%PDF-1.7\n" + bytes(200), "unsupported_format"),
    "zip": (b"PK\x03\x04" + bytes(200), "unsupported_format"),
    "dicom cut in half": (_file("MR_small.dcm")[: len(_file("MR_small.dcm")) // 2], "corrupt_dicom"),
    "dicom cut in its header": (_file("CT_small.dcm")[:1000], "corrupt_dicom"),
    "rt plan": (_file("rtplan.dcm"), "no_pixel_data"),
    "structured report": (_file("test-SR.dcm"), "no_pixel_data"),
    "dicom bomb": (_resaved("CT_small.dcm", Rows=60000, Columns=60000), "image_too_large"),
    "too many frames": (_resaved("emri_small.dcm", NumberOfFrames=100000), "image_too_large"),
    "frames times size too big": (
        _resaved("emri_small.dcm", NumberOfFrames=500, Rows=1000, Columns=1000),
        "image_too_large",
    ),
    "png bomb": (_png_header(100_000, 100_000), "image_too_large"),
    "png cut short": (_png_header(64, 64), "corrupt_image"),
    "jpeg cut short": (_jpeg()[:200], "corrupt_image"),
    "jpeg marker soup": (b"\xff\xd8\xff" + bytes(50), "corrupt_image"),
    "tiff header only": (b"II*\x00" + bytes(4), "corrupt_image"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_has_its_reason(case: str) -> None:
    data, code = CASES[case]
    with pytest.raises(InputRejected) as err:
        decode(data, limits=DecodeLimits(max_frames=512), preprocess=Preprocess())
    assert err.value.code == code, err.value.message
    assert err.value.message


def test_unsupported_transfer_syntax_names_it() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([bytes(64)])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InputRejected) as err:
        decode(buf.getvalue(), limits=DecodeLimits(), preprocess=Preprocess())
    assert err.value.code == "unsupported_transfer_syntax" and "MPEG2" in err.value.message
