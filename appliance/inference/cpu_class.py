"""The CPU's int8 instruction-set class: what ONNX Runtime's int8 kernels (MLAS) dispatch on, so what a
quantized CPU artifact's accuracy and speed depend on.

Read from CPUID as the kernels read it (NumPy's runtime dispatch table), not from /proc/cpuinfo alone: a
hypervisor or an emulator (QEMU's `-cpu Haswell`) can hide features from CPUID that /proc/cpuinfo still
lists, and then the kernels run the lesser path. /proc/cpuinfo only adds what NumPy does not probe
(AVX-VNNI, AMX, Arm i8mm), and only where it agrees with CPUID on everything both can see.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from numpy._core._multiarray_umath import __cpu_features__ as _cpuid

# Worst to best: the int8 kernels each class gets.
X86_CLASSES = ("x86-64", "avx2", "avx512", "avx-vnni", "avx512-vnni", "amx")
ARM_CLASSES = ("neon", "neon-dotprod", "neon-i8mm")
CLASSES = (*X86_CLASSES, *ARM_CLASSES, "other")

# Without VNNI, x86 int8 kernels multiply u8 by s8 with pmaddubsw, whose pairwise int16 sums saturate
# once weights use all 8 bits; 7-bit weights (`reduce_range`) keep every sum in range.
SATURATING = frozenset({"x86-64", "avx2", "avx512"})

DESCRIPTIONS = {
    "x86-64": "x86-64 without AVX2 (SSE4.1 int8 kernels, int16 sums that saturate)",
    "avx2": "x86-64 with AVX2, no VNNI (int16 sums that saturate)",
    "avx512": "x86-64 with AVX-512, no VNNI (int16 sums that saturate)",
    "avx-vnni": "x86-64 with AVX-VNNI (int8 dot products into int32)",
    "avx512-vnni": "x86-64 with AVX-512 VNNI (int8 dot products into int32)",
    "amx": "x86-64 with AMX int8 tiles",
    "neon": "Arm NEON without dot product",
    "neon-dotprod": "Arm NEON with the dot-product extension",
    "neon-i8mm": "Arm NEON with int8 matrix multiply (i8mm)",
    "other": "a CPU without a known int8 kernel class",
}

_CHECKED_BOTH_WAYS = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni"}


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def classify(cpuid: dict[str, bool], flags: set[str], machine: str) -> str:
    """The class from CPUID features (NumPy's names) and /proc/cpuinfo flags; pure, so tests cover every class."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        # Trust the extra flags only where /proc/cpuinfo and CPUID agree on what both report.
        extras = flags if all(cpuid.get(k, False) == (v in flags) for k, v in _CHECKED_BOTH_WAYS.items()) else set()
        avx512 = cpuid.get("AVX512F", False) and cpuid.get("AVX512BW", False)
        if avx512 and {"amx_int8", "amx_tile"} <= extras:
            return "amx"
        if avx512 and cpuid.get("AVX512VNNI", False):
            return "avx512-vnni"
        if cpuid.get("AVX2", False) and "avx_vnni" in extras:
            return "avx-vnni"
        if avx512:
            return "avx512"
        if cpuid.get("AVX2", False):
            return "avx2"
        return "x86-64"
    if machine in ("aarch64", "arm64"):
        if "i8mm" in flags:
            return "neon-i8mm"
        if cpuid.get("ASIMDDP", False) or "asimddp" in flags:
            return "neon-dotprod"
        return "neon"
    return "other"


@functools.cache
def detect() -> str:
    """This host's class, e.g. 'avx2' or 'avx512-vnni'."""
    return classify(dict(_cpuid), _cpuinfo_flags(), platform.machine())


def describe(cpu_class: str) -> str:
    return DESCRIPTIONS.get(cpu_class, cpu_class)
