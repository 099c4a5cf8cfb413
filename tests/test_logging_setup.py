"""The daemon's logging holds back the libraries whose own lines carry patient data or identifiers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import highdicom.valuerep
import pydicom
import pytest
from highdicom.valuerep import check_person_name
from pydicom.valuerep import validate_value

from appliance.logging_setup import setup_logging
from appliance.privacy import module_of

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


NAME = "CQ500-CT-310"  # as anonymisers leave it: one component, digits; highdicom and OpenCV quote such text


@pytest.mark.usefixtures("restored")
def test_every_library_s_warnings_and_lines_reach_the_log_without_their_text(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    setup_logging("DEBUG", json_format=False)
    for _ in range(2):
        check_person_name(NAME)  # highdicom: 'The string "CQ500-CT-310" is unlikely to represent ...'
    validate_value("CS", NAME, pydicom.config.WARN)  # pydicom: "Invalid value for VR CS: 'CQ500-CT-310'"
    assert cv2.imread(str(tmp_path / f"{NAME}.png")) is None  # OpenCV, natively: "can't open/read file: ...310.png"
    logging.getLogger("pylibjpeg").warning("could not decode %s", NAME)
    logging.getLogger("pynetdicom.events").critical("dataset of %s", NAME)
    try:
        raise ValueError(NAME)
    except ValueError:
        logging.getLogger("pydicom.filereader").exception("reading %s failed", NAME)
    out, err = capfd.readouterr()
    said = out + err
    assert "CQ500" not in said and "310" not in said, said
    lines = said.splitlines()
    # Each warning says its category and where it came from; the first from a place at INFO, the next at DEBUG.
    # highdicom's is said where it was called from (stacklevel 2): here.
    highdicom = [line for line in lines if "a UserWarning from tests.test_logging_setup line" in line]
    assert len(highdicom) == 2 and " INFO " in highdicom[0] and " DEBUG " in highdicom[1], lines
    assert any("INFO appliance.warnings [MainThread] a UserWarning from pydicom.valuerep" in x for x in lines), lines
    assert any("WARNING pylibjpeg [MainThread] a line of pylibjpeg's (its text withheld" in line for line in lines), (
        lines
    )
    assert not any("Traceback" in line for line in lines), lines


def test_a_warning_is_named_by_the_module_that_raised_it() -> None:
    assert module_of(highdicom.valuerep.__file__) == "highdicom.valuerep"
    assert module_of(highdicom.__file__) == "highdicom"
    assert module_of("/nowhere/Zz^Janet 1901.py") == "(a module)"
