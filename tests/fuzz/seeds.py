"""The fuzzer's seed corpus: real DICOM files across transfer syntaxes, and rasters encoded here, all small."""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

REPO = Path(__file__).resolve().parents[2]

# pydicom's and pydicom-data's test files, one or more per transfer syntax and pixel layout. Small ones:
# a fuzz case costs about as much as decoding its seed.
DICOM_FILES = (
    # native: explicit/implicit little endian, big endian, deflated
    "MR_small.dcm",
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_2frame.dcm",
    "6154",  # MONOCHROME1, window and rescale
    "17106",
    "rtdose_1frame.dcm",  # 32-bit
    "rtdose.dcm",  # 15 frames, implicit
    "liver_1frame.dcm",  # 1-bit, functional groups
    "image_dfl.dcm",  # deflated
    "meta_missing_tsyntax.dcm",
    "badVR.dcm",
    "MR_truncated.dcm",
    # RLE
    "MR_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "rtdose_rle_1frame.dcm",
    "OBXXXX1A_rle.dcm",  # palette colour
    # JPEG baseline, extended, lossless
    "SC_rgb_small_odd_jpeg.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # YBR_FULL_422
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "JPEG-lossy.dcm",  # 12-bit extended
    "SC_rgb_jpeg_gdcm.dcm",  # lossless process 14
    # JPEG 2000
    "MR_small_jp2klossless.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "693_J2KI.dcm",
    "JPEG2000.dcm",
    "emri_small_jpeg_2k_lossless.dcm",  # 10 frames
    "GDCMJ2K_TextGBR.dcm",  # YBR_RCT
    # JPEG-LS
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    # not images: reports, plans
    "rtstruct.dcm",
    "reportsi.dcm",
)
# Larger files cut down to a corner of their first frames, keeping their lookup tables and groups.
CROPPED_FILES = (
    "vlut_04.dcm",  # VOI LUT sequence
    "mlut_18.dcm",  # modality LUT sequence
    "OT-PAL-8-face.dcm",  # palette colour, no file meta syntax
    "eCT_Supplemental.dcm",  # enhanced CT: per-frame functional groups
    "examples_overlay.dcm",
)
CROP = 48


@dataclass(frozen=True)
class Seed:
    """One input the mutations start from. kind: 'dicom', 'png', 'jpeg' or 'tiff'."""

    name: str
    kind: str
    data: bytes


def _testdata(name: str) -> Path | None:
    path = get_testdata_file(name, download=False)
    return Path(str(path)) if path else None


def _save(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def _cropped(path: Path) -> bytes:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[:2, :CROP, :CROP]
        ds.NumberOfFrames = arr.shape[0]
        if "PerFrameFunctionalGroupsSequence" in ds:
            ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:2]
    else:
        arr = arr[:CROP, :CROP]
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = CROP, CROP
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    return _save(ds)


def _generated_dicom() -> list[Seed]:
    """Layouts the test files lack: float pixel data, signed values under a sigmoid, a syntax change."""

    def header(rows: int, cols: int) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4.5.6"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "OT"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        return ds

    seeds = []
    ramp = np.linspace(-1.0, 1.0, 24 * 20, dtype=np.float32).reshape(24, 20)
    ramp[3, 4] = np.nan
    ds = header(24, 20)
    ds.BitsAllocated = 32
    ds.FloatPixelData = ramp.tobytes()
    seeds.append(Seed("gen-float32", "dicom", _save(ds, ExplicitVRLittleEndian)))
    ds = header(24, 20)
    ds.BitsAllocated = 64
    ds.DoubleFloatPixelData = ramp.astype(np.float64).tobytes()
    seeds.append(Seed("gen-float64", "dicom", _save(ds, ExplicitVRLittleEndian)))
    signed = (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) * 7 - 3000).astype(np.int16)
    ds = header(32, 32)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-100"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "40", "400", "SIGMOID"
    ds.PixelData = signed.tobytes()
    seeds.append(Seed("gen-signed-sigmoid", "dicom", _save(ds, ImplicitVRLittleEndian)))
    for syntax, label in ((DeflatedExplicitVRLittleEndian, "deflated"), (ExplicitVRBigEndian, "big-endian")):
        path = _testdata("CT_small.dcm")
        if path is not None:
            seeds.append(Seed(f"gen-CT_small-{label}", "dicom", _save(pydicom.dcmread(path), syntax)))
    return seeds


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png(rows: np.ndarray, depth: int, colour: int, palette: bytes = b"") -> bytes:
    """A PNG by hand, for the layouts OpenCV does not write (gray and alpha, palette). rows: HxWxC."""
    height, width = rows.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + rows[y].astype(dtype).tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", ihdr)]
    if palette:
        chunks.append(_png_chunk(b"PLTE", palette))
    chunks += [_png_chunk(b"IDAT", zlib.compress(raw, 9)), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _encode(ext: str, arr: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, arr, list(params))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {ext}")
    return buf.tobytes()


def _raster() -> list[Seed]:
    y, x = np.mgrid[0:40, 0:56]
    gray8 = ((x * 4 + y * 2) % 256).astype(np.uint8)
    gray16 = (gray8.astype(np.uint16) * 257 + (x * 13).astype(np.uint16)).astype(np.uint16)
    bgr8 = np.dstack([gray8, 255 - gray8, (x * 9 % 256).astype(np.uint8)])
    bgra8 = np.dstack([bgr8, np.full_like(gray8, 200)])
    bgr16 = (bgr8.astype(np.uint16) * 257).astype(np.uint16)
    seeds = [
        Seed("png-gray8", "png", _encode(".png", gray8)),
        Seed("png-gray16", "png", _encode(".png", gray16)),
        Seed("png-rgb8", "png", _encode(".png", bgr8)),
        Seed("png-rgba8", "png", _encode(".png", bgra8)),
        Seed("png-rgb16", "png", _encode(".png", bgr16)),
        Seed("png-gray-alpha8", "png", png(np.dstack([gray8, 255 - gray8]), 8, 4)),
        Seed("png-gray-alpha16", "png", png(np.dstack([gray16, gray16]), 16, 4)),
        Seed("png-palette", "png", png((gray8 % 16)[..., None], 8, 3, bytes(range(48)))),
        Seed("jpeg-gray", "jpeg", _encode(".jpg", gray8, (cv2.IMWRITE_JPEG_QUALITY, 90))),
        Seed("jpeg-colour", "jpeg", _encode(".jpg", bgr8, (cv2.IMWRITE_JPEG_QUALITY, 75))),
        Seed("jpeg-progressive", "jpeg", _encode(".jpg", bgr8, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))),
        Seed("jpeg-restart", "jpeg", _encode(".jpg", gray8, (cv2.IMWRITE_JPEG_RST_INTERVAL, 2))),
        Seed("tiff-gray8", "tiff", _encode(".tiff", gray8, (cv2.IMWRITE_TIFF_COMPRESSION, 1))),
        Seed("tiff-gray16-lzw", "tiff", _encode(".tiff", gray16, (cv2.IMWRITE_TIFF_COMPRESSION, 5))),
        Seed("tiff-rgb8-deflate", "tiff", _encode(".tiff", bgr8, (cv2.IMWRITE_TIFF_COMPRESSION, 8))),
        Seed("tiff-rgba8-packbits", "tiff", _encode(".tiff", bgra8, (cv2.IMWRITE_TIFF_COMPRESSION, 32773))),
    ]
    ok, pages = cv2.imencodemulti(".tiff", [gray8, gray8[::-1]]) if hasattr(cv2, "imencodemulti") else (False, None)
    if ok and pages is not None:
        seeds.append(Seed("tiff-two-pages", "tiff", pages.tobytes()))
    # The pipeline-test model's own validation images (16-bit gray PNG), where `make model` made them.
    for folder in sorted((REPO / "models" / "pipeline-test" / "validation").glob("*")):
        first = next(iter(sorted(folder.glob("*.png"))), None)
        if first is not None:
            seeds.append(Seed(f"validation-{folder.name}", "png", first.read_bytes()))
    return seeds


@functools.cache
def corpus() -> tuple[Seed, ...]:
    """Every seed, in a fixed order (a case names its seed by index)."""
    seeds: list[Seed] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DICOM_FILES:
            path = _testdata(name)
            if path is not None:
                seeds.append(Seed(name, "dicom", path.read_bytes()))
        for name in CROPPED_FILES:
            path = _testdata(name)
            if path is not None:
                seeds.append(Seed(f"{name}-cropped", "dicom", _cropped(path)))
        seeds += _generated_dicom()
    seeds += _raster()
    return tuple(seeds)
