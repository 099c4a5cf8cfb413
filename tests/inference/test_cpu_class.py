"""The int8 kernel class, read as the kernels read it: from CPUID, with /proc/cpuinfo only where it agrees."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.inference import cpu_class
from appliance.inference.cpu_class import classify

from ..cpu_emulation import AS_AVX2, needs_as_avx2
from ..integration.conftest import REPO

HASWELL = {"AVX2": True, "FMA3": True}
SKX = {**HASWELL, "AVX512F": True, "AVX512BW": True}
ICL = {**SKX, "AVX512VNNI": True}


@pytest.mark.parametrize(
    ("cpuid", "flags", "machine", "expected"),
    [
        ({}, set(), "x86_64", "x86-64"),
        (HASWELL, {"avx2"}, "x86_64", "avx2"),
        (HASWELL, {"avx2", "avx_vnni"}, "x86_64", "avx-vnni"),  # Alder Lake: VNNI without AVX-512
        (SKX, {"avx2", "avx512f", "avx512bw"}, "x86_64", "avx512"),  # Skylake-SP: AVX-512, no VNNI
        (ICL, {"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "x86_64", "avx512-vnni"),
        (ICL, {"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}, "x86_64", "amx"),
        ({"ASIMD": True}, {"asimd"}, "aarch64", "neon"),
        ({"ASIMD": True, "ASIMDDP": True}, {"asimd", "asimddp"}, "aarch64", "neon-dotprod"),
        ({"ASIMD": True, "ASIMDDP": True}, {"asimd", "asimddp", "i8mm"}, "aarch64", "neon-i8mm"),
        ({}, set(), "riscv64", "other"),
    ],
)
def test_every_class_from_its_features(cpuid: dict[str, bool], flags: set[str], machine: str, expected: str) -> None:
    assert classify(cpuid, flags, machine) == expected
    assert expected in cpu_class.CLASSES and cpu_class.describe(expected) != expected


def test_cpuinfo_flags_that_cpuid_hides_are_not_trusted() -> None:
    """Under an emulator or a hypervisor that masks AVX-512, /proc/cpuinfo still lists the host's flags;
    the kernels see CPUID, so AMX or AVX-VNNI from /proc/cpuinfo must not lift the class."""
    host_flags = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "avx_vnni"}
    assert classify(HASWELL, host_flags, "x86_64") == "avx2"


def test_this_host_has_a_known_class() -> None:
    assert cpu_class.detect() in cpu_class.CLASSES
    if platform.machine() == "x86_64":
        assert cpu_class.detect() in cpu_class.X86_CLASSES


@needs_as_avx2
def test_as_an_avx2_only_cpu_the_class_is_avx2(tmp_path: Path) -> None:
    """QEMU reports a Haswell through CPUID while /proc/cpuinfo keeps the host's flags: the class follows CPUID."""
    code = "from appliance.inference.cpu_class import detect; print(detect())"
    r = subprocess.run(
        [str(AS_AVX2), sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "avx2"
