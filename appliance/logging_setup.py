"""Logging for a service: plain lines for a terminal or journald, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time


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
    quiet_pydicom()


def quiet_pydicom() -> None:
    """pydicom logs and warns with the offending element's value (a malformed UID or accession number
    can hold a patient's name). Invalid values are the reader's business, not the log's."""
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("pydicom").propagate = False
    warnings.filterwarnings("ignore", module="pydicom")
