"""The daemon's logging holds back the libraries whose own lines carry patient data or identifiers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from appliance.logging_setup import setup_logging

QUIETED = {"pydicom": logging.ERROR, "pynetdicom": logging.CRITICAL, "highdicom": logging.WARNING}


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate) for name in QUIETED}
    yield
    root.handlers[:], root.level = handlers, level
    for name, (lvl, propagate) in saved.items():
        logging.getLogger(name).setLevel(lvl)
        logging.getLogger(name).propagate = propagate


@pytest.mark.usefixtures("restored")
def test_libraries_that_log_uids_or_datasets_are_held_back_even_at_debug() -> None:
    setup_logging("DEBUG", json_format=False)
    for name, level in QUIETED.items():
        logger = logging.getLogger(name)
        # highdicom names the source image's SOP Instance UID at INFO; pynetdicom dumps datasets at DEBUG.
        assert not logger.isEnabledFor(level - 10) and not logger.propagate, name
