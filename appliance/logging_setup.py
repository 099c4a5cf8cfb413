"""Logging for a service: plain lines for a terminal or journald, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

from appliance.privacy import WarningsToLog, WithholdLibraryText


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, json_format: bool) -> None:
    """Our lines at `level`; pydicom and watchdog, whose lines can carry patient data, held back whatever it is."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    # Whatever a library logs, at any level, goes out without its text (it may quote header values).
    handler.addFilter(WithholdLibraryText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # watchdog logs every event's path at DEBUG, and a scanner may name a file after its patient; our own
    # lines name inputs by their journal id only.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    # pynetdicom logs every failed association retry at ERROR and, at DEBUG, whole datasets (patient data):
    # the receiver and the outbox say what matters in their own lines, with hashed UIDs.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pynetdicom").propagate = False
    # highdicom logs the source image's SOP Instance UID at INFO for every report it makes.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").propagate = False
    for name in ("pynetdicom", "highdicom"):
        # Not propagated, a line with no handler would go to logging.lastResort: raw, on stderr.
        _null_handler(logging.getLogger(name))
    quiet_pydicom()


def quiet_pydicom() -> None:
    """pydicom logs and warns with the offending element's value (a malformed UID or accession number
    can hold a patient's name). Invalid values are the reader's business, not the log's. Every library's
    warnings go through the privacy filter too (`route_warnings`): each process that reads headers calls this."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("pydicom").propagate = False
    _null_handler(logging.getLogger("pydicom"))
    route_warnings()


def route_warnings() -> None:
    """Every warning of every library (highdicom's about a person name quotes it; pydicom's, an invalid value)
    becomes a log line naming its category and module only (privacy.WarningsToLog); OpenCV's native log, which
    writes to stderr past Python, is silenced."""
    import warnings

    # "always": the filter's "default" would remember every distinct text (a patient's name) for the life of
    # the process; WarningsToLog throttles by place instead.
    warnings.simplefilter("always")
    if not isinstance(warnings.showwarning, WarningsToLog):
        warnings.showwarning = WarningsToLog()
    try:
        import cv2
    except ImportError:
        return
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _null_handler(logger: logging.Logger) -> None:
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
