"""Recognises an input's format from its bytes and hands it to the right reader; every failure is a rejection."""

from __future__ import annotations

from appliance.errors import CorruptImage, EmptyFile, InputRejected, UnsupportedFormat
from appliance.imaging.dicom import parse, read_dicom
from appliance.imaging.raster import read_raster, sniff
from appliance.imaging.types import DecodedImage, DecodeLimits
from appliance.manifest import Preprocess

DICOM_MAGIC_OFFSET = 128


def looks_like_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _bare_dicom(data: bytes, limits: DecodeLimits, preprocess: Preprocess) -> DecodedImage | None:
    """Old archives hold DICOM without the preamble and 'DICM'. Parse leniently; accept it only if it
    really is an image object, so a text file or random bytes stay 'unsupported_format'."""
    try:
        ds = parse(data, force=True)
    except InputRejected:
        return None
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        return None
    return read_dicom(data, limits=limits, preprocess=preprocess, force=True)


def decode(data: bytes, *, limits: DecodeLimits, preprocess: Preprocess, name: str = "") -> DecodedImage:
    """Bytes -> display-ready frames. Raises an InputRejected subclass, never anything else."""
    if not data:
        raise EmptyFile()
    try:
        if looks_like_dicom(data):
            return read_dicom(data, limits=limits, preprocess=preprocess)
        kind = sniff(data)
        if kind is not None:
            return read_raster(data, kind, limits=limits, preprocess=preprocess)
        bare = _bare_dicom(data, limits, preprocess)
        if bare is not None:
            return bare
    except (InputRejected, MemoryError):
        raise
    except Exception as e:  # the last line of the per-input error boundary
        raise CorruptImage(f"The image could not be decoded ({type(e).__name__}).") from e
    raise UnsupportedFormat()
