"""Hostile DICOM files built on the spot: small on disk, huge or inconsistent once decoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

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
