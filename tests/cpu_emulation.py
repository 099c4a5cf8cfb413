"""Running a command as on an AVX2-only CPU: ../shared/tools/as-avx2 (QEMU user mode), where it can run."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest

AS_AVX2 = Path(__file__).resolve().parents[2] / "shared" / "tools" / "as-avx2"


def _why_not() -> str:
    if platform.machine() != "x86_64":
        return "QEMU's Haswell model runs x86-64 code only"
    if not AS_AVX2.is_file():
        return "../shared/tools/as-avx2 is not beside this checkout"
    if shutil.which("qemu-x86_64") is None and not (shutil.which("apt-get") and os.geteuid() == 0):
        return "needs qemu-user to run as an AVX2-only CPU: apt-get install qemu-user"
    return ""


needs_as_avx2 = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
