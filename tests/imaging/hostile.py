"""Hostile DICOM files built on the spot: small on disk, huge or inconsistent once decoded."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from appliance.domain.errors import InputRejected
from appliance.domain.manifest import Preprocess
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits

MIB = 1 << 20


def image_header(rows: int = 64, cols: int = 64, frames: int | None = None, **values: object) -> Dataset:
    """A 16-bit MONOCHROME2 Secondary Capture header, without pixel data."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _file_meta(ds: Dataset, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    buf.write(bytes(128) + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _dataset_bytes(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def save(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflate_bomb(pixel_bytes: int, rows: int = 64, cols: int = 64) -> bytes:
    """Deflated Explicit VR Little Endian: a rows x cols header over `pixel_bytes` of zeros, which deflate
    about 1000:1. Built from one compressed block of zeros repeated, so a gigabyte costs no gigabyte here."""
    ds = image_header(rows, cols)
    head = _dataset_bytes(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)]
    # After a full flush the compressor forgets what it saw: the same MiB of zeros compresses the same.
    block = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert again == block
    whole, rest = divmod(pixel_bytes, MIB)
    stream.append(block * (whole - 1) + again)
    stream.append(compressor.compress(bytes(rest)) + compressor.flush())
    return _file_meta(ds, DeflatedExplicitVRLittleEndian) + b"".join(stream)


def deflated(ds: Dataset) -> bytes:
    """A well-formed Deflated Explicit VR Little Endian file of `ds`."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return _file_meta(ds, DeflatedExplicitVRLittleEndian) + compressor.compress(_dataset_bytes(ds)) + compressor.flush()


def native(rows: int, cols: int, frames: int | None, pixel_bytes: int) -> bytes:
    """Native 16-bit pixel data of `pixel_bytes` under a header declaring rows x cols x frames."""
    ds = image_header(rows, cols, frames)
    ds.PixelData = np.arange(pixel_bytes // 2, dtype=np.uint16).tobytes()
    return save(ds)


def rle_fragments(frames: int, fragments: int, rows: int = 64, cols: int = 64) -> bytes:
    """RLE Lossless with `fragments` one-frame fragments under a header declaring `frames`, no offset table."""
    ds = image_header(rows, cols)
    frame = np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols)
    ds.PixelData = frame.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, encoding_plugin="pydicom")
    one = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([one] * fragments, has_bot=False)
    ds["PixelData"].VR = "OB"
    return save(ds, RLELossless)


def _encapsulated(ds: Dataset, frame: bytes, syntax: str) -> bytes:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return save(ds, syntax)


def jpeg_claiming(claimed: tuple[int, int], rows: int = 64, cols: int = 64, fill: bool = False) -> bytes:
    """JPEG Baseline under a rows x cols 8-bit header, its SOF rewritten to claim `claimed` (rows, columns).
    ``fill``: 0xFF fill bytes before each marker after SOI, as ISO/IEC 10918-1 allows."""
    image = (np.random.default_rng(rows * cols).random((rows, cols)) * 255).astype(np.uint8)
    jpeg = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    at = jpeg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, at + 5, *claimed)
    if fill:
        jpeg = bytearray(jpeg[:2] + jpeg[2:].replace(b"\xff\xdb", b"\xff\xff\xff\xdb"))
    ds = image_header(rows, cols, BitsAllocated=8, BitsStored=8, HighBit=7)
    return _encapsulated(ds, bytes(jpeg), JPEGBaseline8Bit)


def jpeg_decoy(claimed: tuple[int, int], rows: int = 64, cols: int = 64) -> bytes:
    """A JPEG whose marker chain breaks after SOI: a reader that takes any two bytes as a marker jumps over the
    real SOF (claiming `claimed`) to a decoy of rows x cols, while libjpeg skips to the next 0xFF and reads the
    real one."""
    image = (np.random.default_rng(7).random((rows, cols)) * 255).astype(np.uint8)
    jpeg = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    at = jpeg.index(b"\xff\xc0")
    sof = bytes(jpeg[at : at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")])
    real = bytearray(sof)
    struct.pack_into(">HH", real, 5, *claimed)
    # b"\x00\x00" read as a marker with length len(real) + 2 lands exactly on the decoy
    junk = b"\x00\x00" + struct.pack(">H", len(real) + 2)
    body = bytes(jpeg[2:at]) + bytes(jpeg[at + len(sof) :])
    stream = b"\xff\xd8" + junk + bytes(real) + sof + body
    ds = image_header(rows, cols, BitsAllocated=8, BitsStored=8, HighBit=7)
    return _encapsulated(ds, stream, JPEGBaseline8Bit)


def compressed_claiming(syntax: str, claimed: tuple[int, int] | None, rows: int = 64, cols: int = 64) -> bytes:
    """A 16-bit (12 stored) frame compressed by pydicom's own encoders (JPEG-LS, JPEG 2000, RLE), its codestream's
    size then rewritten to `claimed` (rows, columns); None: left as encoded."""
    ds = image_header(rows, cols, BitsStored=12, HighBit=11)
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4093).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(syntax, **({"j2k_cr": [20]} if syntax == JPEG2000 else {}))
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    if claimed is not None:
        if frame.startswith(b"\xff\x4f"):  # JPEG 2000: SIZ's Xsiz, Ysiz (offsets 0)
            struct.pack_into(">II", frame, 8, claimed[1], claimed[0])
        elif frame.startswith(b"\xff\xd8"):  # JPEG-LS: SOF55's rows, columns
            at = frame.index(b"\xff\xf7")
            struct.pack_into(">HH", frame, at + 5, *claimed)
        else:  # RLE: no sizes; the segment count instead
            struct.pack_into("<I", frame, 0, claimed[0])
    return _encapsulated(ds, bytes(frame), syntax)


def refusal_and_peak(data: bytes) -> tuple[InputRejected, int]:
    """Decode ``data`` as the worker does: its rejection, and the most memory Python and numpy held at once on
    the way to it (tracemalloc)."""
    tracemalloc.start()
    try:
        with pytest.raises(InputRejected) as err:
            decode(data, limits=DecodeLimits(), preprocess=Preprocess())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return err.value, peak


def good_png(folder: Path, seed: int) -> Path:
    """An honest 64 x 64 PNG in ``folder``, to go beside the hostile ones: what must still be scored."""
    path = folder / f"good-{seed}.png"
    image = (np.random.default_rng(seed).random((64, 64)) * 255).astype(np.uint8)
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return path
