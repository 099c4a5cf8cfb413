"""Mutations of a seed: byte havoc, and edits that know DICOM elements, fragments, PNG chunks, JPEG and TIFF.

Every choice comes from a `Source`: a seeded `random.Random` for campaigns (case i of seed S is always the same
bytes, whatever ran before it) or Hypothesis's data for the property test (which shrinks a failing plan).
"""

from __future__ import annotations

import functools
import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from tests.fuzz.seeds import Seed

T = TypeVar("T")


class Source(Protocol):
    """Where a case's choices come from."""

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        ...

    def raw(self, n: int) -> bytes:
        """n arbitrary bytes."""
        ...


class RandomSource:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def below(self, n: int) -> int:
        return self.rng.randrange(n)

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)


def pick(src: Source, options: Sequence[T]) -> T:
    return options[src.below(len(options))]


def between(src: Source, lo: int, hi: int) -> int:
    return lo + src.below(hi - lo + 1)


def chance(src: Source, percent: int) -> bool:
    return src.below(100) < percent


@dataclass(frozen=True)
class Case:
    """One fuzz input and how it was made from its seed."""

    seed: str
    kind: str
    data: bytes
    steps: tuple[str, ...]


def interesting(src: Source, original: int, bits: int) -> int:
    """A boundary value, or one near the original, that fits in `bits`."""
    top = (1 << bits) - 1
    options = [0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 64, 255, 256, 4096, 65535, 65536, 1 << 20, 1 << 24]
    options += [top, top >> 1, (top >> 1) + 1, original + 1, original - 1, original * 2, original // 2]
    options += [original * 16, original + 2, src.below(top + 1)]
    return pick(src, options) & top


# --- byte havoc -------------------------------------------------------------------------------


def _flip(src: Source, data: bytes) -> tuple[bytes, str]:
    out = bytearray(data)
    n = between(src, 1, 8)
    for _ in range(n):
        i = src.below(len(out))
        out[i] ^= 1 << src.below(8)
    return bytes(out), f"flip {n} bits"


def _set_bytes(src: Source, data: bytes) -> tuple[bytes, str]:
    out = bytearray(data)
    n = between(src, 1, 4)
    for _ in range(n):
        out[src.below(len(out))] = pick(src, [0x00, 0xFF, 0x7F, 0x80, 0x01, src.below(256)])
    return bytes(out), f"set {n} bytes"


def _set_word(src: Source, data: bytes) -> tuple[bytes, str]:
    size = pick(src, [2, 4])
    if len(data) < size:
        return data, "set word (too short)"
    at = src.below(len(data) - size + 1)
    order = pick(src, ["<", ">"])
    fmt = order + ("H" if size == 2 else "I")
    (old,) = struct.unpack(fmt, data[at : at + size])
    value = interesting(src, old, size * 8)
    return data[:at] + struct.pack(fmt, value) + data[at + size :], f"word@{at}={value}"


def _truncate(src: Source, data: bytes) -> tuple[bytes, str]:
    at = src.below(len(data))
    return data[:at], f"truncate@{at}"


def _delete(src: Source, data: bytes) -> tuple[bytes, str]:
    at = src.below(len(data))
    n = between(src, 1, max(1, min(256, len(data) - at)))
    return data[:at] + data[at + n :], f"delete {n}@{at}"


def _insert(src: Source, data: bytes) -> tuple[bytes, str]:
    at = src.below(len(data) + 1)
    n = between(src, 1, 64)
    blob = src.raw(n) if chance(src, 50) else bytes([pick(src, [0, 0xFF, src.below(256)])]) * n
    return data[:at] + blob + data[at:], f"insert {n}@{at}"


def _duplicate(src: Source, data: bytes) -> tuple[bytes, str]:
    at = src.below(len(data))
    n = between(src, 1, max(1, min(512, len(data) - at)))
    to = src.below(len(data) + 1)
    return data[:to] + data[at : at + n] + data[to:], f"copy {n}@{at} to {to}"


def _splice(src: Source, data: bytes, corpus: Sequence[Seed], kind: str) -> tuple[bytes, str]:
    same = [s for s in corpus if s.kind == kind]
    other = pick(src, same if same and chance(src, 75) else list(corpus))
    at, start = src.below(len(data) + 1), src.below(len(other.data))
    return data[:at] + other.data[start:], f"splice {other.name}[{start}:]@{at}"


HAVOC: tuple[Callable[[Source, bytes], tuple[bytes, str]], ...] = (
    _flip,
    _flip,
    _set_bytes,
    _set_word,
    _truncate,
    _delete,
    _insert,
    _duplicate,
)


# --- DICOM: element-aware edits, as patches on the seed's bytes ---------------------------------

# (start, end, replacement) on the seed's bytes; applied from the end so earlier offsets stay valid.
Patch = tuple[int, int, bytes, str]
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class Loc:
    """Where an element of the seed sits: its value, and its length field."""

    tag: int
    vr: str
    value_at: int
    length: int
    length_at: int
    length_size: int
    little: bool
    implicit: bool
    top: bool  # in the top-level dataset (not the file meta, not inside a sequence)


@dataclass(frozen=True)
class DicomLayout:
    locs: tuple[Loc, ...]
    little: bool
    implicit: bool
    items: tuple[tuple[int, int], ...]  # encapsulated pixel data: (item header offset, item length)
    delimiter: int | None  # offset of the sequence delimiter item, if any


@functools.cache
def dicom_layout(name: str, data: bytes) -> DicomLayout | None:
    """The seed's elements, found by pydicom (value offsets); None where it cannot be parsed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _layout(data)


def _layout(data: bytes) -> DicomLayout | None:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return None
    syntax = ds.file_meta.get("TransferSyntaxUID")
    implicit, little = ds.original_encoding if syntax is None else (syntax.is_implicit_VR, syntax.is_little_endian)
    deflated = syntax is not None and syntax.is_deflated
    locs: list[Loc] = []

    def walk(d: Dataset, meta: bool, depth: int) -> None:
        for tag in list(d.keys()):
            elem = d.get_item(tag)
            if isinstance(elem, RawDataElement):
                if elem.value_tell is None or (deflated and not meta):
                    continue  # a deflated dataset's offsets are into the inflated stream
                imp, lit = (False, True) if meta else (implicit, little)
                vr = elem.VR or _vr(elem.tag)
                size = 4 if imp or vr in _LONG_VRS else 2
                locs.append(
                    Loc(elem.tag, vr, elem.value_tell, elem.length, elem.value_tell - size, size, lit, imp, depth == 0)
                )
            elif elem.VR == "SQ" and not meta:
                try:
                    for item in elem.value:
                        walk(item, meta, depth + 1)
                except Exception:
                    continue

    try:
        walk(ds.file_meta, True, -1)
        walk(ds, False, 0)
    except Exception:
        return None
    items: list[tuple[int, int]] = []
    delimiter = None
    pixel = next((loc for loc in locs if loc.tag == 0x7FE00010 and loc.length == 0xFFFFFFFF), None)
    if pixel is not None:
        at = pixel.value_at
        while at + 8 <= len(data):
            group, element, length = struct.unpack("<HHI", data[at : at + 8])
            if (group, element) == (0xFFFE, 0xE000):
                items.append((at, length))
                at += 8 + length
            else:
                if (group, element) == (0xFFFE, 0xE0DD):
                    delimiter = at
                break
    return DicomLayout(tuple(locs), bool(little), bool(implicit), tuple(items), delimiter)


def _element_start(loc: Loc) -> int:
    """Where the element's tag begins: tag, [VR, [reserved]], length, value."""
    return loc.length_at - (4 if loc.implicit else (8 if loc.length_size == 4 else 6))


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.1.98",
    "1.2.3.4",
    "",
)
# Text values to try, by tag: the header fields the reader trusts or converts.
_TEXT: dict[int, tuple[str, ...]] = {
    0x00020010: _SYNTAXES,
    0x00280008: ("0", "1", "2", "3", "-1", "512", "513", "100000", "99999999999", "1.5", "", "x", " 2"),  # frames
    0x00280004: (  # photometric
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "YBR_PARTIAL_420",
        "PALETTE COLOR",
        "ARGB",
        "CMYK",
        "HSV",
        "",
        "MONOCHROME3",
    ),
    0x00281050: ("0", "-1", "40", "1e308", "nan", "inf", "-inf", "40\\400", "", "1e-300", "x"),  # window centre
    0x00281051: ("0", "-1", "1", "400", "1e308", "nan", "inf", "", "1e-300", "0.5"),  # window width
    0x00281052: ("0", "-1024", "1e308", "nan", "-inf", "", "x"),  # rescale intercept
    0x00281053: ("0", "1", "-1", "1e308", "nan", "inf", "1e-45", "", "x"),  # rescale slope
    0x00281056: ("LINEAR", "LINEAR_EXACT", "SIGMOID", "", "CUBIC"),  # VOI LUT function
    0x00280103: ("0", "1", "2"),
}
# Integer header fields (US, or SS-or-US) the reader and the decoders read.
_NUMBERS = {
    0x00280002,  # samples per pixel
    0x00280006,  # planar configuration
    0x00280010,  # rows
    0x00280011,  # columns
    0x00280100,  # bits allocated
    0x00280101,  # bits stored
    0x00280102,  # high bit
    0x00280103,  # pixel representation
    0x00283002,  # LUT descriptor
    0x00281101,  # palette descriptors
    0x00281102,
    0x00281103,
}
# Elements worth adding where the seed lacks them: (tag, VR, values).
_ADDITIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0x00280008, "IS", ("2", "3", "100", "0", "-5")),
    (0x00280006, "US", ("1", "0", "2")),
    (0x00281050, "DS", ("40", "nan", "1e308")),
    (0x00281051, "DS", ("400", "0", "1e-300")),
    (0x00281053, "DS", ("0", "-1", "1e308")),
    (0x00281056, "CS", ("SIGMOID", "LINEAR_EXACT")),
    (0x00280120, "US", ("0", "65535")),  # pixel padding value
    (0x00280004, "CS", ("MONOCHROME2", "PALETTE COLOR")),
)


def _pad(value: bytes, vr: str) -> bytes:
    if len(value) % 2 == 0:
        return value
    return value + (b"\x00" if vr in ("UI", "OB") else b" ")


def _length_bytes(loc: Loc, length: int) -> bytes:
    order = "<" if loc.little else ">"
    if loc.length_size == 2:
        return struct.pack(order + "H", length & 0xFFFF)
    return struct.pack(order + "I", length & 0xFFFFFFFF)


def _encode_element(tag: int, vr: str, text: str, little: bool, implicit: bool) -> bytes:
    order = "<" if little else ">"
    value = struct.pack(order + "H", int(text) & 0xFFFF) if vr == "US" else _pad(text.encode("ascii"), vr)
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(order + "I", len(value)) + value
    return head + vr.encode("ascii") + struct.pack(order + "H", len(value)) + value


def _dicom_patch(src: Source, data: bytes, layout: DicomLayout) -> Patch | None:
    locs = layout.locs
    # Encapsulated seeds get their fragments edited a third of the time; the rest is spread evenly.
    what = 4 if layout.items and chance(src, 35) else src.below(9)
    if what == 0:  # a text field the reader trusts
        options = [loc for loc in locs if loc.tag in _TEXT]
        if not options:
            return None
        loc = pick(src, options)
        text = pick(src, _TEXT[loc.tag])
        encoded = _pad(text.encode("ascii"), loc.vr)
        return (
            loc.length_at,
            loc.value_at + loc.length,
            _length_bytes(loc, len(encoded)) + encoded,
            f"{loc.tag:08X}={text!r}",
        )
    if what == 1:  # an integer field
        options = [loc for loc in locs if loc.tag in _NUMBERS and loc.length >= 2] or [
            loc for loc in locs if loc.vr in ("US", "SS") and loc.length >= 2
        ]
        if not options:
            return None
        loc = pick(src, options)
        order = "<" if loc.little else ">"
        at = loc.value_at + 2 * src.below(max(1, loc.length // 2))
        (old,) = struct.unpack(order + "H", data[at : at + 2])
        value = interesting(src, old, 16)
        return (at, at + 2, struct.pack(order + "H", value), f"{loc.tag:08X}[{at - loc.value_at}]={value}")
    if what == 2:  # any element's length field
        loc = pick(src, locs)
        bits = loc.length_size * 8
        value = pick(src, [interesting(src, loc.length, bits), 0xFFFFFFFF, len(data) - loc.value_at])
        return (loc.length_at, loc.length_at + loc.length_size, _length_bytes(loc, value), f"len {loc.tag:08X}={value}")
    if what == 3:  # the pixel data's value: cut, or grown
        pixel = [loc for loc in locs if loc.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)]
        if not pixel or pixel[0].length == 0xFFFFFFFF:
            return None
        loc = pixel[0]
        end = loc.value_at + loc.length
        if chance(src, 50):
            keep = src.below(loc.length + 1)
            return (loc.value_at + keep, end, b"", f"pixel data cut to {keep}")
        extra = src.raw(between(src, 1, 64)) if chance(src, 50) else bytes(between(src, 1, 4096))
        fix = chance(src, 50)
        if fix:
            body = data[loc.value_at : end] + extra
            return (loc.length_at, end, _length_bytes(loc, len(body)) + body, f"pixel data +{len(extra)}, length fixed")
        return (end, end, extra, f"pixel data +{len(extra)}")
    if what == 4 and layout.items:  # fragments: an item's length, the offset table, drop or repeat an item
        index = src.below(len(layout.items))
        at, length = layout.items[index]
        op = src.below(5)
        if op == 0:
            value = pick(src, [interesting(src, length, 32), 0xFFFFFFFF, 0])
            return (at + 4, at + 8, struct.pack("<I", value), f"item {index} length={value}")
        if op == 1 and layout.items[0][1] >= 4:
            first = layout.items[0][0] + 8
            entry = first + 4 * src.below(layout.items[0][1] // 4)
            value = interesting(src, struct.unpack("<I", data[entry : entry + 4])[0], 32)
            return (entry, entry + 4, struct.pack("<I", value), f"offset table[{(entry - first) // 4}]={value}")
        if op == 2:
            return (at, at + 8 + length, b"", f"drop item {index}")
        if op == 3:
            return (at, at, data[at : at + 8 + length], f"repeat item {index}")
        if layout.delimiter is not None:
            return (layout.delimiter, layout.delimiter + 8, b"", "drop sequence delimiter")
        return None
    if what == 5:  # add a header element where it is missing
        tag, vr, values = pick(src, _ADDITIONS)
        tops = [loc for loc in locs if loc.top]
        if not tops or any(loc.tag == tag and loc.top for loc in locs):
            return None
        after = next((loc for loc in tops if loc.tag > tag), None)
        if after is None:
            return None
        at = _element_start(after)
        text = pick(src, values)
        return (at, at, _encode_element(tag, vr, text, layout.little, layout.implicit), f"add {tag:08X}={text}")
    if what == 6:  # the preamble and magic: a bare dataset, or a broken magic
        if data[128:132] != b"DICM":
            return None
        if chance(src, 70):
            meta_end = max((loc.value_at + loc.length for loc in locs if loc.tag >> 16 == 2), default=132)
            cut = pick(src, [132, meta_end])
            return (0, cut, b"", f"strip first {cut} bytes")
        return (128, 132, b"DICN", "bad magic")
    if what == 7:  # a value's bytes
        loc = pick(src, [loc for loc in locs if loc.length not in (0, 0xFFFFFFFF)] or list(locs))
        if loc.length in (0, 0xFFFFFFFF):
            return None
        at = loc.value_at + src.below(loc.length)
        return (at, at + 1, bytes([src.below(256)]), f"value byte {loc.tag:08X}+{at - loc.value_at}")
    # a whole element dropped
    loc = pick(src, locs)
    if loc.length == 0xFFFFFFFF:
        return None
    return (_element_start(loc), loc.value_at + loc.length, b"", f"drop {loc.tag:08X}")


def _apply(data: bytes, patches: list[Patch]) -> tuple[bytes, list[str]]:
    done: list[str] = []
    limit = len(data) + 1
    for start, end, replacement, label in sorted(patches, key=lambda p: (p[0], p[1]), reverse=True):
        if end > limit or start > end:
            continue  # overlaps a later patch already applied
        data = data[:start] + replacement + data[end:]
        limit = start
        done.append(label)
    return data, done


_NATIVE = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
)


@functools.cache
def _dataset(name: str, data: bytes) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return None


def _reencode(src: Source, seed: Seed) -> tuple[bytes, str] | None:
    """Change one header value through pydicom and write the file again, possibly in another native syntax
    (the way to reach a deflated dataset's elements)."""
    base = _dataset(seed.name, seed.data)
    if base is None or "TransferSyntaxUID" not in base.file_meta:
        return None
    ds = base.copy()
    ds.file_meta = base.file_meta.copy()  # type: ignore[assignment]
    syntax = ds.file_meta.TransferSyntaxUID
    keyword, value = pick(
        src,
        [
            ("Rows", interesting(src, int(ds.get("Rows", 64) or 64), 16)),
            ("Columns", interesting(src, int(ds.get("Columns", 64) or 64), 16)),
            ("BitsAllocated", pick(src, [1, 8, 12, 16, 24, 32, 64])),
            ("BitsStored", pick(src, [1, 7, 8, 12, 15, 16, 17, 32])),
            ("SamplesPerPixel", pick(src, [0, 1, 2, 3, 4])),
            ("NumberOfFrames", pick(src, ["0", "1", "2", "7", "600"])),
            ("PhotometricInterpretation", pick(src, _TEXT[0x00280004])),
            ("PixelRepresentation", pick(src, [0, 1])),
            ("PlanarConfiguration", pick(src, [0, 1])),
        ],
    )
    target = pick(src, _NATIVE) if str(syntax) in _NATIVE else str(syntax)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
            ds.file_meta.TransferSyntaxUID = UID(target)
            pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    except Exception:
        return None
    return buf.getvalue(), f"rewrite {keyword}={value} as {target}"


# --- PNG, JPEG, TIFF --------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, type) of each chunk."""
    chunks = []
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunks.append((at, length, kind))
        if kind == b"IEND" or at + 12 + length > len(data):
            break
        at += 12 + length
    return chunks


def _chunk(kind: bytes, body: bytes, crc: bool = True) -> bytes:
    check = zlib.crc32(kind + body) & 0xFFFFFFFF if crc else 0
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", check)


def _png_patch(src: Source, data: bytes) -> tuple[bytes, str] | None:
    chunks = _png_chunks(data)
    if not chunks:
        return None
    crc = chance(src, 85)  # most edits keep the checksum right, so that the decoder reads on
    what = src.below(6)
    if what == 0 and chunks[0][2] == b"IHDR" and chunks[0][1] == 13:
        at = chunks[0][0]
        fields = list(struct.unpack(">IIBBBBB", data[at + 8 : at + 21]))
        index = src.below(7)
        if index < 2:
            fields[index] = pick(src, [interesting(src, fields[index], 31), 8944, 20000, 1 << 31])
        else:
            fields[index] = pick(src, [0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 255])
        body = struct.pack(">IIBBBBB", *fields)
        return data[:at] + _chunk(b"IHDR", body, crc) + data[at + 25 :], f"IHDR[{index}]={fields[index]}"
    at, length, kind = pick(src, chunks)
    if what == 1:
        value = interesting(src, length, 32)
        return data[:at] + struct.pack(">I", value) + data[at + 4 :], f"{kind!r} length={value}"
    if what == 2:
        return data[:at] + data[at + 12 + length :], f"drop {kind!r}"
    if what == 3:
        return data[:at] + data[at : at + 12 + length] + data[at:], f"repeat {kind!r}"
    if what == 4:  # the image data itself, inflated, changed and deflated again
        idats = [c for c in chunks if c[2] == b"IDAT"]
        if not idats:
            return None
        stream = b"".join(data[a + 8 : a + 8 + n] for a, n, _ in idats)
        try:
            raw = bytearray(zlib.decompress(stream))
        except zlib.error:
            return None
        if not raw:
            return None
        for _ in range(between(src, 1, 6)):
            raw[src.below(len(raw))] = pick(src, [0, 1, 2, 3, 4, 5, 0xFF, src.below(256)])
        if chance(src, 25):
            raw = raw[: src.below(len(raw) + 1)] if chance(src, 50) else raw + bytes(src.below(4096) + 1)
        first, last = idats[0][0], idats[-1][0] + 12 + idats[-1][1]
        body = _chunk(b"IDAT", zlib.compress(bytes(raw)), crc)
        return data[:first] + body + data[last:], "IDAT rewritten"
    extra = pick(
        src,
        [
            (b"PLTE", src.raw(pick(src, [3, 6, 767, 768, 771]))),
            (b"tRNS", src.raw(between(src, 0, 300))),
            (b"sBIT", src.raw(between(src, 0, 5))),
            (b"iCCP", b"x\x00\x00" + src.raw(between(src, 0, 200))),
            (b"tEXt", b"k\x00" + src.raw(between(src, 0, 64))),
            (b"IDAT", zlib.compress(bytes(between(src, 1, 1 << 16)))),
        ],
    )
    return data[:at] + _chunk(extra[0], extra[1], crc) + data[at:], f"insert {extra[0]!r} before {kind!r}"


_JPEG_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, length) of each marker segment up to and including the start of scan."""
    segments = []
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _JPEG_STANDALONE or marker == 0xFF:
            at += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        segments.append((at, marker, length))
        if marker == 0xDA:
            break
        at += 2 + length
    return segments


def _jpeg_patch(src: Source, data: bytes) -> tuple[bytes, str] | None:
    segments = _jpeg_segments(data)
    if not segments:
        return None
    what = src.below(5)
    sof = [s for s in segments if s[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB)]
    if what == 0 and sof:
        at = sof[0][0] + 4
        field = src.below(5)
        if field == 0:  # precision
            return data[:at] + bytes([pick(src, [0, 2, 8, 12, 16, 255])]) + data[at + 1 :], "SOF precision"
        if field in (1, 2):  # height, width
            old = struct.unpack(">H", data[at + 2 * field - 1 : at + 2 * field + 1])[0]
            value = interesting(src, old, 16)
            pos = at + 2 * field - 1
            return data[:pos] + struct.pack(">H", value) + data[pos + 2 :], f"SOF {'hw'[field - 1]}={value}"
        if field == 3:  # component count
            return data[: at + 5] + bytes([pick(src, [0, 1, 2, 3, 4, 255])]) + data[at + 6 :], "SOF components"
        pos = at + 7 + 3 * src.below(3)  # a component's sampling factors
        return data[:pos] + bytes([pick(src, [0x00, 0x11, 0x12, 0x21, 0x22, 0x44, 0x41, 0xFF])]) + data[pos + 1 :], (
            "SOF sampling"
        )
    at, marker, length = pick(src, segments)
    if what == 1:
        value = interesting(src, length, 16)
        return data[: at + 2] + struct.pack(">H", value) + data[at + 4 :], f"segment {marker:02X} length={value}"
    if what == 2:
        return data[:at] + data[at + 2 + length :], f"drop segment {marker:02X}"
    if what == 3:
        return data[:at] + data[at : at + 2 + length] + data[at:], f"repeat segment {marker:02X}"
    # a marker in the entropy-coded data: a restart, an early end of image, a fresh start of frame
    scan = segments[-1][0] + 2 + segments[-1][2]
    if scan >= len(data):
        return None
    pos = scan + src.below(len(data) - scan)
    mark = pick(src, [0xD0, 0xD3, 0xD7, 0xD9, 0xD8, 0xC0, 0xDD, 0xC4])
    return data[:pos] + bytes([0xFF, mark]) + data[pos:], f"marker {mark:02X} in scan"


_TIFF_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 338, 339)


def _tiff_patch(src: Source, data: bytes) -> tuple[bytes, str] | None:
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    except struct.error:
        return None
    entries = [ifd + 2 + 12 * n for n in range(count) if ifd + 14 + 12 * n <= len(data)]
    what = src.below(5)
    if what == 0 or not entries:  # the first IFD's offset, or the next IFD's (a loop back to itself)
        if chance(src, 50) or not entries:
            value = pick(src, [0, 8, ifd, len(data), 0xFFFFFFFF, interesting(src, ifd, 32)])
            return data[:4] + struct.pack(order + "I", value) + data[8:], f"IFD offset={value}"
        at = ifd + 2 + 12 * count
        value = pick(src, [ifd, 8, 0xFFFFFFFF, interesting(src, ifd, 32)])
        return data[:at] + struct.pack(order + "I", value) + data[at + 4 :], f"next IFD={value}"
    if what == 1:
        value = interesting(src, count, 16)
        return data[:ifd] + struct.pack(order + "H", value) + data[ifd + 2 :], f"IFD entries={value}"
    wanted = [e for e in entries if struct.unpack(order + "H", data[e : e + 2])[0] in _TIFF_TAGS]
    at = pick(src, wanted if wanted and chance(src, 80) else entries)
    tag, kind, n = struct.unpack(order + "HHI", data[at : at + 8])
    if what == 2:  # the value (or offset)
        if kind == 3 and n <= 2:
            (old,) = struct.unpack(order + "H", data[at + 8 : at + 10])
            value = interesting(src, old, 16)
            return data[: at + 8] + struct.pack(order + "H", value) + data[at + 10 :], f"tag {tag}={value}"
        (old,) = struct.unpack(order + "I", data[at + 8 : at + 12])
        value = interesting(src, old, 32)
        return data[: at + 8] + struct.pack(order + "I", value) + data[at + 12 :], f"tag {tag}={value}"
    if what == 3:  # the type
        value = pick(src, [0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 16, 17, 18, 99])
        return data[: at + 2] + struct.pack(order + "H", value) + data[at + 4 :], f"tag {tag} type={value}"
    value = interesting(src, n, 32)  # the count
    return data[: at + 4] + struct.pack(order + "I", value) + data[at + 8 :], f"tag {tag} count={value}"


# --- a whole case -----------------------------------------------------------------------------


def make_case(src: Source, corpus: Sequence[Seed]) -> Case:
    """A seed and one to five mutations of it (one, half of the time: inputs that stay close to a valid
    file reach deeper into the decoders): structure-aware edits first, on the seed's own layout, then
    byte havoc."""
    seed = pick(src, corpus)
    data, steps = seed.data, []
    count = pick(src, (1, 1, 1, 1, 2, 2, 3, 5))
    structural = sum(chance(src, 70) for _ in range(count))
    if seed.kind == "dicom" and structural:
        if chance(src, 10):
            rewritten = _reencode(src, seed)
            if rewritten is not None:
                data, step = rewritten
                steps.append(step)
        else:
            layout = dicom_layout(seed.name, seed.data)
            patches = [p for p in (_dicom_patch(src, data, layout) for _ in range(structural)) if p] if layout else []
            data, done = _apply(data, patches)
            steps += reversed(done)
    elif structural:
        edit = {"png": _png_patch, "jpeg": _jpeg_patch, "tiff": _tiff_patch}[seed.kind]
        for _ in range(structural):
            result = edit(src, data)
            if result is not None:
                data, step = result
                steps.append(step)
    for _ in range(max(count - len(steps), 0 if steps else 1)):
        if not data:
            break
        if chance(src, 8):
            data, step = _splice(src, data, corpus, seed.kind)
        else:
            data, step = pick(src, HAVOC)(src, data)
        steps.append(step)
    return Case(seed=seed.name, kind=seed.kind, data=data, steps=tuple(steps))


def case_for(seed: int, index: int, corpus: Sequence[Seed]) -> Case:
    """Case `index` of the campaign `seed`: the same bytes on every run, independent of the other cases."""
    return make_case(RandomSource(random.Random(f"fuzz:{seed}:{index}")), corpus)
