"""Log-safe stand-ins for identifiers: logs carry hashes, never UIDs, names, IDs or birth dates."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import traceback

INVALID = "(invalid value)"
_TOKEN = re.compile(r"[A-Za-z0-9 ._-]{1,64}")
_UID = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20}){1,30}")
# A header value goes into a message only where the standard fixes what it can be: a patient's name in
# Modality is a short token of letters too, so these fields are held to their defined terms (PS3.3
# C.7.3.1.1.1 and C.7.6.3.1.2, retired terms included).
_MODALITIES = (
    "AR ASMT AU BDUS BI BMD CD CF CP CR CS CT CTPROTOCOL DD DF DG DM DOC DS DX EC ECG EPS ES FA FID FS GM HC HD IO "
    "IOL IVOCT IVUS KER KO LEN LP LS M3D MA MG MR MS NM OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR "
    "PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF ST "
    "STAIN TEXTUREMAP TG US VA VF XA XC"
)
_DEFINED_TERMS: dict[str, frozenset[str]] = {
    "Modality": frozenset(_MODALITIES.split()),
    "PhotometricInterpretation": frozenset(
        {
            "MONOCHROME1",
            "MONOCHROME2",
            "PALETTE COLOR",
            "RGB",
            "HSV",
            "ARGB",
            "CMYK",
            "YBR_FULL",
            "YBR_FULL_422",
            "YBR_PARTIAL_422",
            "YBR_PARTIAL_420",
            "YBR_ICT",
            "YBR_RCT",
            "XYB",
        }
    ),
}
# Dotted numbers only: no letters, so no name can hide in them.
_UID_KEYWORDS = frozenset({"TransferSyntaxUID", "SOPClassUID", "MediaStorageSOPClassUID"})


def hashed(value: str) -> str:
    """A short, stable, one-way tag for a DICOM UID, so log lines can be correlated without exposing it."""
    if not value:
        return "-"
    return "#" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]


def header_value(keyword: str, value: object) -> str:
    """A DICOM header value fit for a rejection message (which goes to the log, the .reason.txt and the
    stream): kept only for a field that cannot identify anyone (Modality, Photometric Interpretation, a
    transfer syntax or SOP class UID) and only if it is a valid value of that field; else '(invalid value)'.
    A value with a newline would otherwise forge log lines; any other field may hold a patient's name."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return "(missing)"
    if not _TOKEN.fullmatch(text):
        return INVALID
    if keyword in _DEFINED_TERMS:
        return text if text.upper() in _DEFINED_TERMS[keyword] else INVALID
    if keyword in _UID_KEYWORDS:
        return text if _UID.fullmatch(text) else INVALID
    return INVALID


def log_failure(logger: logging.Logger, message: str, *args: object, error: BaseException) -> None:
    """Log a failure by its type only: exception texts can carry file names or DICOM values, which may
    hold patient names. Where it happened (the stack, without any exception's text) goes to DEBUG."""
    logger.error(message + ": %s", *args, type(error).__name__)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("where the failure above happened:\n%s", stack_without_values(error))


def stack_without_values(error: BaseException) -> str:
    """The frames of an exception and of its causes, each named by type only (no message, no locals)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.format_tb(current.__traceback__)
        parts.append("".join(frames) + type(current).__name__)
        current = current.__cause__ or current.__context__
    return "\n-- which led to --\n".join(reversed(parts))


# The appliance's own loggers: their lines name inputs by journal id and UIDs by hash. Every other logger is a
# library's, whose text may quote a header value or a file name.
OURS = "appliance"
_MODULE = re.compile(r"[A-Za-z0-9_.]{1,200}")
_WARNING_PLACES = 1024  # places remembered as having warned (a bounded set: each is a line of library code)
warnings_log = logging.getLogger("appliance.warnings")


class WithholdLibraryText(logging.Filter):
    """A handler's filter: a library's log line keeps its logger and level, its text (and traceback) is withheld;
    the appliance's own lines pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OURS or record.name.startswith(OURS + "."):
            return True
        record.msg = "a line of %s's (its text withheld: it may quote header values or file names)"
        record.args = (record.name,)
        record.exc_info = record.exc_text = record.stack_info = None
        return True


class WarningsToLog:
    """A `warnings.showwarning`: every warning, whatever library raised it, becomes a log line that names its
    category and the module and line that raised it, never its text (highdicom's quotes a patient's name). The
    first from each place is logged at INFO, the rest at DEBUG."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, int]] = set()

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        place = (category.__name__, module_of(filename), int(lineno))
        first = place not in self._seen
        if first and len(self._seen) < _WARNING_PLACES:
            self._seen.add(place)
        warnings_log.log(
            logging.INFO if first else logging.DEBUG,
            "a %s from %s line %d (its text withheld: it may quote header values)",
            *place,
        )


def module_of(filename: str) -> str:
    """The dotted module a source file is imported as (its path under the longest sys.path entry holding it)."""
    path = os.path.abspath(filename) if filename else ""
    for root in sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True):
        if path.startswith(root + os.sep):
            dotted = os.path.splitext(path[len(root) + 1 :])[0].replace(os.sep, ".").removesuffix(".__init__")
            return dotted if _MODULE.fullmatch(dotted) else "(a module)"
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if _MODULE.fullmatch(stem) else "(a module)"
