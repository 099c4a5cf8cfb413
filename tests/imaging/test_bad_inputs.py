"""Every kind of bad input gets its own stable reason code from the reader, on real bytes; nothing else escapes."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from appliance.domain.errors import InputRejected
from appliance.domain.manifest import Preprocess
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits

from . import hostile

# Planted in every DICOM made here: no rejection message may repeat them.
PATIENT = {"PatientName": "Sentinel^Patricia", "PatientID": "PID-SENTINEL-4711", "PatientBirthDate": "19450307"}


def _path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is missing from pydicom's test data"
    return Path(str(path))


def _file(name: str) -> bytes:
    return _path(name).read_bytes()


def _save(ds: Dataset) -> bytes:
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _resaved(name: str, syntax: str | None = None, **changes: object) -> bytes:
    ds = pydicom.dcmread(_path(name))
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return _save(ds)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _huge_dicom() -> bytes:
    """A hand-made header claiming 60000 x 60000 pixels over 16 bytes of pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()  # Secondary Capture
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 60000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(16)
    return _save(ds)


def _encapsulated(syntax: str) -> bytes:
    """CT_small re-labelled with a syntax no installed plugin decodes, its pixels put in one fragment."""
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([ds.PixelData[:64]])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def _encoded(ext: str, shape: tuple[int, ...] = (64, 64, 3), dtype: type = np.uint8) -> bytes:
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    img: np.ndarray = (np.random.default_rng(1).random(shape) * top).astype(dtype)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _huge_jpeg() -> bytes:
    """A real JPEG whose start-of-frame is patched to claim 65000 x 65000."""
    data = bytearray(_encoded(".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _huge_tiff() -> bytes:
    """A little-endian TIFF header and first IFD claiming 100000 x 100000."""
    entries = [(256, 4, 1, 100_000), (257, 4, 1, 100_000), (258, 3, 1, 8), (262, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def _twelve_bit_jpeg() -> bytes:
    """The 12-bit JPEG stream inside JPGExtended.dcm, as a .jpg file."""
    ds = pydicom.dcmread(_path("JPGExtended.dcm"))
    return b"".join(next(generate_fragmented_frames(ds.PixelData)))


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("study/readme.txt", "images inside " * 50)
    return buf.getvalue()


# name: (bytes, expected code); limits are the defaults unless LIMITS says otherwise
CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero bytes": (lambda: b"", "empty_file"),
    "random bytes": (lambda: np.random.default_rng(7).bytes(4096), "unsupported_format"),
    "random bytes, short": (lambda: np.random.default_rng(8).bytes(3), "unsupported_format"),
    "text file": (lambda: b"Patient list, do not scan\nline two\n" * 20, "unsupported_format"),
    "pdf": (lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 5, "unsupported_format"),
    "zip": (_zip, "unsupported_format"),
    "dicom cut in half": (lambda: _half(_resaved("MR_small.dcm")), "corrupt_dicom"),
    "dicom cut in its header": (lambda: _resaved("CT_small.dcm")[:1000], "corrupt_dicom"),
    "jpeg 2000 dicom cut in half": (lambda: _half(_file("MR_small_jp2klossless.dcm")), "corrupt_dicom"),
    "MR_truncated.dcm": (lambda: _file("MR_truncated.dcm"), "corrupt_dicom"),
    "encapsulated pixel data too short": (
        lambda: _file("emri_small_jpeg_2k_lossless_too_short.dcm"),
        "corrupt_dicom",
    ),
    "broken jpeg 2000 stream": (
        # Its frame's SIZ, cut off by a sequence delimiter inside it, reads as 3,722,445,056 columns
        lambda: _file("JPEG2000-embedded-sequence-delimiter.dcm"),
        "codestream_mismatch",
    ),
    "malformed 12-bit jpeg stream": (lambda: _file("JPEG-lossy.dcm"), "corrupt_dicom"),
    "rt plan": (lambda: _resaved("rtplan.dcm"), "no_pixel_data"),
    "structured report": (lambda: _resaved("test-SR.dcm"), "no_pixel_data"),
    "truncated rt plan": (lambda: _file("rtplan_truncated.dcm"), "no_pixel_data"),
    "dicom claiming 60000x60000": (_huge_dicom, "image_too_large"),
    "too many frames": (lambda: _resaved("emri_small.dcm", NumberOfFrames=100_000), "image_too_large"),
    "frames times size too big": (
        lambda: _resaved("emri_small.dcm", NumberOfFrames=500, Rows=1000, Columns=1000),
        "image_too_large",
    ),
    "multi-frame under a reject policy": (lambda: _resaved("emri_small.dcm"), "multiframe_rejected"),
    "unknown private transfer syntax": (
        lambda: _encapsulated("1.2.3.4"),
        "unsupported_transfer_syntax",
    ),
    "MPEG2 transfer syntax": (
        lambda: _encapsulated("1.2.840.10008.1.2.4.100"),
        "unsupported_transfer_syntax",
    ),
    "unsupported photometric": (
        lambda: _resaved("SC_rgb.dcm", PhotometricInterpretation="CMYK"),
        "unsupported_pixel_format",
    ),
    "png claiming 100000x100000": (lambda: _png_header(100_000, 100_000), "image_too_large"),
    "jpeg claiming 65000x65000": (_huge_jpeg, "image_too_large"),
    "tiff claiming 100000x100000": (_huge_tiff, "image_too_large"),
    "png cut in half": (lambda: _half(_encoded(".png")), "corrupt_image"),
    "16-bit png cut in half": (lambda: _half(_encoded(".png", (64, 64), np.uint16)), "corrupt_image"),
    "png header only": (lambda: _png_header(64, 64), "corrupt_image"),
    "jpeg cut in half": (lambda: _half(_encoded(".jpg")), "corrupt_image"),
    "jpeg without its last bytes": (lambda: _encoded(".jpg")[:-2], "corrupt_image"),
    "jpeg marker soup": (lambda: b"\xff\xd8\xff" + bytes(50), "corrupt_image"),
    "tiff cut in half": (lambda: _half(_encoded(".tiff")), "corrupt_image"),
    "tiff header only": (lambda: b"II*\x00" + bytes(4), "corrupt_image"),
    "12-bit jpeg file": (_twelve_bit_jpeg, "unsupported_pixel_format"),
    "float tiff": (lambda: _encoded(".tiff", (8, 8), np.float32), "unsupported_pixel_format"),
}


LIMITS = {"multi-frame under a reject policy": DecodeLimits(multiframe="reject")}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the files cut short, as it should
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_has_its_reason(case: str) -> None:
    make, code = CASES[case]
    with pytest.raises(InputRejected) as err:
        decode(make(), limits=LIMITS.get(case, DecodeLimits()), preprocess=Preprocess())
    assert err.value.code == code, err.value.message
    message = err.value.message
    assert message.endswith(".") and len(message) > 20
    for value in PATIENT.values():
        assert value not in message and value.split("^")[0] not in message


def test_unsupported_transfer_syntax_is_named() -> None:
    with pytest.raises(InputRejected) as err:
        decode(_encapsulated("1.2.840.10008.1.2.4.100"), limits=DecodeLimits(), preprocess=Preprocess())
    assert "MPEG2" in err.value.message and "1.2.840.10008.1.2.4.100" in err.value.message


def test_decoder_failures_keep_their_cause() -> None:
    with pytest.raises(InputRejected) as err:
        decode(_file("JPEG-lossy.dcm"), limits=DecodeLimits(), preprocess=Preprocess())
    assert err.value.__cause__ is not None  # raised `from` pydicom's error, for the DEBUG traceback


SIZE_BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "dicom": (_huge_dicom, "60000x60000"),
    "png": (lambda: _png_header(100_000, 100_000), "100000x100000"),
    "jpeg": (_huge_jpeg, "65000x65000"),
    "tiff": (_huge_tiff, "100000x100000"),
}


@pytest.mark.parametrize("case", list(SIZE_BOMBS), ids=list(SIZE_BOMBS))
def test_size_bombs_are_refused_from_the_header_without_decoding(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, claimed = SIZE_BOMBS[case]
    data = make()
    decoded: list[str] = []  # every pixel decoder the readers use, each noting a call instead of decoding

    def decoder(name: str) -> Callable[..., object]:
        def note(*args: object, **kwargs: object) -> object:
            decoded.append(name)
            raise RuntimeError(f"{name} ran")

        return note

    monkeypatch.setattr(cv2, "imdecode", decoder("cv2.imdecode"))
    monkeypatch.setattr(pydicom.pixels, "iter_pixels", decoder("pydicom.pixels.iter_pixels"))
    monkeypatch.setattr(pydicom.pixels, "pixel_array", decoder("pydicom.pixels.pixel_array"))
    error, peak = hostile.refusal_and_peak(data)
    assert decoded == []
    assert error.code == "image_too_large"
    assert claimed in error.message  # the size the header claims, checked before any decoding
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


FUZZ_SOURCES: dict[str, Callable[[], bytes]] = {
    "dicom": lambda: _file("MR_small.dcm"),
    "dicom rle": lambda: _file("MR_small_RLE.dcm"),
    "dicom jpeg-ls": lambda: _file("MR_small_jpeg_ls_lossless.dcm"),
    "dicom jpeg 2000": lambda: _file("MR_small_jp2klossless.dcm"),
    "dicom jpeg baseline": lambda: _file("SC_rgb_jpeg_dcmtk.dcm"),
    "png": lambda: _encoded(".png"),
    "jpeg": lambda: _encoded(".jpg"),
    "tiff": lambda: _encoded(".tiff"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every damaged value it meets
@pytest.mark.parametrize("source", list(FUZZ_SOURCES), ids=list(FUZZ_SOURCES))
def test_damaged_files_are_decoded_or_rejected_never_crash(source: str) -> None:
    original = FUZZ_SOURCES[source]()
    rng = np.random.default_rng(2024)
    outcomes: set[str] = set()
    for _ in range(40):
        data = bytearray(original)
        # A few random bytes overwritten, sometimes also the tail cut off.
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            del data[int(rng.integers(1, len(data))) :]
        try:
            image = decode(bytes(data), limits=DecodeLimits(), preprocess=Preprocess())
        except InputRejected as e:
            outcomes.add(e.code)
            continue
        assert isinstance(image, DecodedImage) and image.frames
        for frame in image.frames:
            assert frame.dtype == np.float32 and np.isfinite(frame).all()
            assert frame.min() >= 0.0 and frame.max() <= 1.0
        outcomes.add("decoded")
    assert "internal_error" not in outcomes and "input_rejected" not in outcomes
