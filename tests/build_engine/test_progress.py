"""make engine's progress: counted bars with the time left for each long step on a terminal (a real pseudo-
terminal here), nothing of them in a pipe (the builds the other tests run capture stderr: conftest checks it)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from ..integration.conftest import REPO
from .conftest import INT8

# Each long step's bar, as tqdm draws it: what, how many of how many, elapsed<left.
STEPS = ("reading calibration images", "reading validation images", "FP32 reference", "calibrating",
         "gate: onnxruntime int8", "speed by batch size")  # fmt: skip


def _on_a_terminal(*args: str | Path) -> tuple[int, str]:
    """`python -m build_engine` with stdout and stderr on a pseudo-terminal; what the terminal showed."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns, as a terminal has
    env = {key: value for key, value in os.environ.items() if key != "APPLIANCE_NO_PROGRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "build_engine", *map(str, args)], stdout=side, stderr=side, cwd=REPO, env=env
    )
    os.close(side)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the build exited and closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    return proc.wait(timeout=600), shown.decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_each_long_step_shows_a_counted_bar_with_the_time_left(
    pipeline_model: Path, tmp_path: Path
) -> None:
    code, shown = _on_a_terminal("--model", pipeline_model, "--engines", tmp_path / "engines", *INT8)
    assert code == 0, shown[-3000:]
    for step in STEPS:
        assert f"{step}:" in shown, f"no bar for {step!r}:\n{shown[-3000:]}"
    assert "gate: onnxruntime int8:   0%|" in shown and "| 0/128 [" in shown  # counted: the validation images
    # A bar past its start shows the time left (pipeline-test's gate is done before its first refresh).
    assert re.search(r"speed by batch size: +\d+%\|.*\| \d/5 \[\d\d:\d\d<\d\d:\d\d", shown), shown[-3000:]
    assert "passed" in shown and "wrote" in shown  # the report's lines as ever
