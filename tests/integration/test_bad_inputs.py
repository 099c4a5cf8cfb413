"""Table of bad inputs: each gets a specific reason on the stream and in the log, is moved aside, and
the daemon keeps scoring good files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from appliance.v1 import scoring_pb2 as pb
from tests.waiting import eventually

from .conftest import drop, png_bytes


def _dicom(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header and a tiny IDAT that claims a decompression-bomb size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dicom_claiming(rows: int, cols: int) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.Rows, ds.Columns = rows, cols
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _unsupported_syntax() -> bytes:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder for it here
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BAD = {
    "empty.dcm": (b"", "empty_file"),
    "notes.txt": (b"Patient said the scan was fine.\n" * 20, "unsupported_format"),
    "random.bin": (bytes(range(256)) * 40, "unsupported_format"),
    "truncated.dcm": (_dicom("CT_small.dcm")[:3000], "corrupt_dicom"),
    "rtplan.dcm": (_dicom("rtplan.dcm"), "no_pixel_data"),
    "report.dcm": (_dicom("test-SR.dcm"), "no_pixel_data"),
    "bomb.png": (_png_claiming(100_000, 100_000), "image_too_large"),
    "bomb.dcm": (_dicom_claiming(60_000, 60_000), "image_too_large"),
    "truncated.png": (png_bytes(5, size=256)[:400], "corrupt_image"),
    "mpeg2.dcm": (_unsupported_syntax(), "unsupported_transfer_syntax"),
    "bad-jpeg-stream.dcm": (_dicom("JPEG-lossy.dcm"), "corrupt_dicom"),  # a real file libjpeg refuses
}


def test_each_bad_input_is_rejected_with_its_reason_and_moved_aside(make_daemon) -> None:
    d = make_daemon()
    d.start()
    drop(d.incoming, "good-before.png", png_bytes(1))
    for name, (data, _code) in BAD.items():
        drop(d.incoming, name, data)
    drop(d.incoming, "good-after.png", png_bytes(2))

    results = {r.file_name: r for r in d.collect(len(BAD) + 2)}
    for name, (_data, code) in BAD.items():
        r = results[name]
        assert r.outcome == pb.OUTCOME_REJECTED, name
        assert r.rejection.code == code, (name, r.rejection.code, r.rejection.message)
        assert r.rejection.message.endswith("."), r.rejection.message
    for good in ("good-before.png", "good-after.png"):
        assert results[good].outcome == pb.OUTCOME_SCORED

    # Each reason is written before its file is moved beside it: wait for both.
    eventually(
        lambda: {p.name.split("-", 1)[1] for p in d.rejected.iterdir()},
        "every rejected file set aside with its reason",
        until=lambda names: all({n, f"{n}.reason.txt"} <= names for n in BAD),
        timeout=10,
    )
    reasons = {
        p.name.split("-", 1)[1].removesuffix(".reason.txt"): p.read_text() for p in d.rejected.glob("*.reason.txt")
    }
    assert set(reasons) == set(BAD)
    for name, (_data, code) in BAD.items():
        assert f"code: {code}" in reasons[name]
        assert (d.rejected / next(p.name for p in d.rejected.iterdir() if p.name.endswith(f"-{name}"))).exists()
    # Each rejection is logged just after it is committed (and may be streamed): read until all are.
    log = eventually(
        d.log,
        "every rejection logged",
        until=lambda log: all(f"code={code}" in log for _data, code in BAD.values()),
        timeout=10,
    )
    # No patient data in the log: CT_small's patient name and ID appear nowhere.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    assert str(ds.PatientName) not in log and str(ds.PatientID) not in log
    assert d.status().rejected == len(BAD)
