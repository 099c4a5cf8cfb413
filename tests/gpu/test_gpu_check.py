"""`make gpu-check` (build_engine/gpu_check.py) on this host: a step whose prerequisite is missing here is
skipped with the reason its own check found, a step that could run and failed makes the exit status
non-zero. Nothing of ours is mocked; where this host has what a step needs, the test that would run it
is skipped instead (`make gpu-check` itself runs those steps)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.inference.backends import cuda
from build_engine import gpu_check

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TENSORRT_STEPS = ("TensorRT build of pipeline-test", "TensorRT build of brain-mri-vgg16", "make bench on TensorRT")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; these steps would run (make gpu-check)")
def test_without_tensorrt_its_steps_are_skipped_with_the_import_error(tmp_path: Path) -> None:
    steps = [s for s in gpu_check.steps(tmp_path / "bench.toml") if s.name in TENSORRT_STEPS]
    outcomes = gpu_check.run_all(steps)
    assert [(o.step, o.result) for o in outcomes] == [(name, "skipped") for name in TENSORRT_STEPS]
    assert {o.why for o in outcomes} == {"TensorRT does not import (No module named 'tensorrt')"}
    assert rows(gpu_check.report(outcomes))[-1] == (
        "make bench on TensorRT",
        "skipped",
        "TensorRT does not import (No module named 'tensorrt')",
    )
    assert gpu_check.exit_status(outcomes) == 0  # a skip is not a failure


@pytest.mark.skipif(bool(shutil.which("compute-sanitizer")), reason="compute-sanitizer is on PATH here")
def test_without_compute_sanitizer_the_sanitized_run_is_skipped(tmp_path: Path) -> None:
    (step,) = [s for s in gpu_check.steps(tmp_path / "bench.toml") if "compute-sanitizer" in s.name]
    assert gpu_check.run_all([step]) == [gpu_check.Outcome(step.name, "skipped", "compute-sanitizer is not on PATH")]


def test_a_step_that_could_run_and_failed_fails_the_check_and_what_needs_it_is_skipped() -> None:
    failing = gpu_check.Step("fails", [sys.executable, "-c", "print('it broke'); raise SystemExit(3)"], lambda: "")
    passing = gpu_check.Step("passes", [sys.executable, "-c", "print('fine')"], lambda: "")
    after = gpu_check.Step("after", [sys.executable, "-c", "pass"], lambda: "", needs=("passes", "fails"))
    outcomes = gpu_check.run_all([failing, passing, after])
    assert outcomes == [
        gpu_check.Outcome("fails", "failed", "exit status 3: it broke"),
        gpu_check.Outcome("passes", "ran", "fine"),
        gpu_check.Outcome("after", "skipped", "needs fails to have run"),
    ]
    assert gpu_check.exit_status(outcomes) == 1


def test_the_bench_must_have_run_on_tensorrt() -> None:
    line = "workload {w}: 200 files, model brain-mri-vgg16 on {b} ({a}), 16 CPUs\n"
    on_trt = line.format(w="mr", b="tensorrt", a="x.plan") + line.format(w="radiograph", b="tensorrt", a="y.plan")
    assert gpu_check.judge_bench(on_trt) == (True, "mr on tensorrt (x.plan); radiograph on tensorrt (y.plan)")
    passed, why = gpu_check.judge_bench(line.format(w="mr", b="onnxruntime", a="model.int8.onnx"))
    assert not passed and why.startswith("not on TensorRT: mr on onnxruntime (model.int8.onnx)")
    assert gpu_check.judge_bench("no figures\n") == (False, "the bench printed no workload line")


def test_the_bench_config_selects_tensorrt_with_absolute_paths(tmp_path: Path) -> None:
    repo_config = gpu_check.REPO / "appliance.toml"
    written = gpu_check.write_bench_config(repo_config, tmp_path)
    config = load_config(written)
    assert config.inference.backend == "tensorrt"
    assert config.model.dir == load_config(repo_config).model.dir and config.model.dir.is_absolute()
    assert config.model.engines_dir == load_config(repo_config).model.engines_dir


@pytest.mark.skipif(
    HAS_TENSORRT or not cuda.gpu_problem() or bool(shutil.which("compute-sanitizer")),
    reason="this host can run some of the steps; `make gpu-check` runs them",
)
def test_on_a_cpu_box_the_whole_check_skips_every_step_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == 0
    table = rows(capsys.readouterr().out.strip())  # nothing ran, so the table is all there is
    assert [step for step, _, _ in table] == [
        "gpu tests (pytest -m gpu)",
        "stand-in TensorRT test under compute-sanitizer",
        *TENSORRT_STEPS,
        gpu_check.TRITON_STEP,
    ]
    assert {result for _, result, _ in table} == {"skipped"}
    assert table[0][2] == cuda.gpu_problem().rstrip(".")


def rows(table: str) -> list[tuple[str, ...]]:
    """The report's rows, under its two header lines, as (step, result, why)."""
    return [tuple(re.split(r"\s{2,}", line, maxsplit=2)) for line in table.splitlines()[2:]]
