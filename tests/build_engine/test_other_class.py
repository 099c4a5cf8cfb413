"""Each recipe on the other class's real int8 kernels, under QEMU as an AVX2-only CPU (../shared/tools/as-avx2).

An artifact gated here with full 8-bit weights (this host has VNNI) gives other scores on AVX2's saturating
kernels, and its load-time self-check must say so; the 7-bit recipe chosen for AVX2 gives the same scores
on both. The key alone would refuse either: these tests re-key the copy to AVX2, as a wrong or forged key
would, to show the self-check is the second lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.inference import cpu_class
from appliance.inference.backends.onnxruntime import onnxruntime_stem

from ..cpu_emulation import AS_AVX2, needs_as_avx2
from ..integration.conftest import REPO
from .conftest import INT8, build

PROBE = """
import sys
from pathlib import Path
from appliance.config import InferenceConfig
from appliance.inference.cpu_class import detect
from appliance.inference.loader import open_served
from appliance.domain.manifest import load_manifest
served = open_served(load_manifest(Path(sys.argv[1])), InferenceConfig(backend="onnxruntime"), Path(sys.argv[2]))
print(detect(), served.precision, *served.passed_over, sep="\\n")
"""

pytestmark = [
    pytest.mark.skipif(
        cpu_class.detect() in cpu_class.SATURATING,
        reason="this CPU has no VNNI, and QEMU cannot emulate a CPU with more than the host has",
    ),
    needs_as_avx2,
    pytest.mark.slow,  # two builds of their own
]


def _on_avx2(model: Path, engines: Path, recipe_class: str) -> list[str]:
    """Build here with `recipe_class`'s recipe, re-key the copy to AVX2, and load it as an AVX2-only CPU."""
    r = build("--model", model, "--engines", engines, *INT8, "--cpu-class", recipe_class)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = engines / "pipeline-test"
    record = folder / f"{onnxruntime_stem(cpu_class.detect())}.json"
    raw = json.loads(record.read_text())
    raw["key"]["cpu_class"] = "avx2"
    record.unlink()
    (folder / f"{onnxruntime_stem('avx2')}.json").write_text(json.dumps(raw))
    probe = subprocess.run(
        [str(AS_AVX2), sys.executable, "-c", PROBE, str(model), str(engines)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.strip().splitlines()
    assert lines[0] == "avx2"  # the emulated CPU is what the kernels and our probe see
    return lines[1:]


def test_full_8_bit_weights_fail_their_self_check_on_avx2_kernels(pipeline_model: Path, tmp_path: Path) -> None:
    precision, *passed_over = _on_avx2(pipeline_model, tmp_path, cpu_class.detect())
    assert precision == "fp32"
    assert any("failed its self-check" in p and "other kernels" in p for p in passed_over)


def test_the_7_bit_recipe_for_avx2_gives_the_same_scores_there(pipeline_model: Path, tmp_path: Path) -> None:
    precision, *passed_over = _on_avx2(pipeline_model, tmp_path, "avx2")
    assert precision == "int8", passed_over
