"""Recognises an input's format from its bytes and hands it to the right reader; every failure is a rejection."""

from __future__ import annotations

from pydicom.dataset import Dataset

from appliance.domain.errors import CorruptDicom, CorruptImage, EmptyFile, InputRejected, UnsupportedFormat
from appliance.domain.manifest import Preprocess
from appliance.imaging.dicom import decode_dataset, parse, read_dicom
from appliance.imaging.raster import read_raster, sniff
from appliance.imaging.types import DecodedImage, DecodeLimits, ShrinkTo

DICOM_MAGIC_OFFSET = 128


def looks_like_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then 'DICM'."""
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def bare_dicom(data: bytes) -> Dataset | None:
    """Old archives hold DICOM without the preamble and 'DICM'. Parse leniently and accept only an object
    that really is DICOM (a SOP class or pixel data), so a text file or random bytes stay unsupported."""
    try:
        ds = parse(data, force=True)
    except InputRejected:
        return None
    return ds if "SOPClassUID" in ds or "PixelData" in ds else None


def decode(
    data: bytes,
    *,
    limits: DecodeLimits,
    preprocess: Preprocess,
    name: str = "",
    shrink: ShrinkTo | None = None,
    display: ShrinkTo | None = None,
) -> DecodedImage:
    """Bytes -> display-ready frames. Raises an InputRejected subclass, never anything else but MemoryError.

    `name` is the file's name, accepted for the caller's convenience; the bytes alone decide the format,
    and the name never goes into a message (it may carry a patient's name). With `shrink`, grayscale
    DICOM frames come back already shrunk to the size preprocessing would resize them to; with `display`,
    a DICOM input's frames as shown come back too, from the same decode (`DecodedImage.display_frames`).
    """
    if not data:
        raise EmptyFile()
    dicom = looks_like_dicom(data)
    kind = None if dicom else sniff(data)
    try:
        if dicom:
            return read_dicom(data, limits=limits, preprocess=preprocess, shrink=shrink, display=display)
        if kind is not None:
            return read_raster(data, kind, limits=limits, preprocess=preprocess)
        ds = bare_dicom(data)
        if ds is not None:
            dicom = True
            return decode_dataset(ds, limits=limits, preprocess=preprocess, shrink=shrink, display=display)
    except (InputRejected, MemoryError):
        raise
    except Exception as e:  # the last line of the per-input error boundary; the readers have their own
        if dicom:
            raise CorruptDicom(f"The DICOM file could not be decoded ({type(e).__name__}).") from e
        raise CorruptImage(f"The image could not be decoded ({type(e).__name__}).") from e
    raise UnsupportedFormat()
