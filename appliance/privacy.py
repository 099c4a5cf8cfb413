"""Log-safe stand-ins for identifiers: logs carry hashes, never UIDs, names, IDs or birth dates."""

from __future__ import annotations

import hashlib
import logging


def hashed(value: str) -> str:
    """A short, stable, one-way tag for a DICOM UID, so log lines can be correlated without exposing it."""
    if not value:
        return "-"
    return "#" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]


def log_failure(logger: logging.Logger, message: str, *args: object, error: BaseException) -> None:
    """Log a failure by its type only: exception texts can carry file names or DICOM values, which may
    hold patient names. The full traceback goes to DEBUG, for a support session that opts in."""
    logger.error(message + ": %s", *args, type(error).__name__)
    logger.debug("traceback of the failure above", exc_info=error)
