"""Log-safe stand-ins for identifiers: logs carry hashes, never UIDs, names, IDs or birth dates."""

from __future__ import annotations

import hashlib


def hashed(value: str) -> str:
    """A short, stable, one-way tag for a DICOM UID, so log lines can be correlated without exposing it."""
    if not value:
        return "-"
    return "#" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
