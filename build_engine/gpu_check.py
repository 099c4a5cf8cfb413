"""`make gpu-check`: the checks only a box with an NVIDIA GPU can run, in one command, then one report.

Each step is guarded: a step whose prerequisite is missing here (the GPU, TensorRT, CuPy,
compute-sanitizer, a step before it) is skipped with the reason instead of failing, so the same command
runs on a CPU box, on a cloud image with a GPU but no TensorRT, and on a full TensorRT host. The exit
status is non-zero only when a step that could run failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.inference.backends import cuda
from appliance.toolkit import load_config

REPO = Path(__file__).resolve().parents[1]
STAND_IN_TEST = "tests/gpu/test_tensorrt_slots.py"
MODELS = ("models/pipeline-test", "models/brain-mri-vgg16")

RAN, SKIPPED, FAILED = "ran", "skipped", "failed"

Problem = Callable[[], str]  # '' when a prerequisite is present here, else why it is not (one phrase)
Judge = Callable[[str], tuple[bool, str]]  # from a step's output: (passed, one line why)


@dataclass(frozen=True)
class Outcome:
    step: str
    result: str  # RAN | SKIPPED | FAILED
    why: str


@dataclass(frozen=True)
class Step:
    name: str
    command: Sequence[str]
    problem: Problem
    needs: tuple[str, ...] = ()  # steps that must have run first: a bench of plans that did not build says nothing
    judge: Judge | None = None  # a failure the exit status does not show; None: the last line says it


# --- prerequisites, each detected for real on this host ----------------------------------------------


def tensorrt_problem() -> str:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or an OSError from a TensorRT whose libraries are missing
        return f"TensorRT does not import ({e})"
    return ""


def gpu_problem() -> str:
    return cuda.gpu_problem().rstrip(".")


def module_problem(name: str, hint: str) -> Problem:
    return lambda: "" if importlib.util.find_spec(name) is not None else f"{name} is not installed ({hint})"


def tool_problem(tool: str) -> Problem:
    return lambda: "" if shutil.which(tool) else f"{tool} is not on PATH"


def file_problem(path: Path, hint: str) -> Problem:
    return lambda: "" if path.is_file() else f"{path.relative_to(REPO)} is missing ({hint})"


def first_problem(*problems: Problem) -> Problem:
    """The first missing prerequisite, checked in order (the cheapest and most telling first)."""

    def check() -> str:
        for problem in problems:
            found = problem()
            if found:
                return found
        return ""

    return check


# --- what each step's output says ---------------------------------------------------------------------


def last_line(output: str) -> str:
    lines = [line.strip(" =") for line in output.splitlines() if line.strip(" =")]
    return lines[-1] if lines else "(no output)"


def judge_bench(output: str) -> tuple[bool, str]:
    """Which backend each workload ran on: the bench runs the config's backend (tensorrt here), and a
    workload that ran elsewhere means the bench did not measure what this check is for."""
    ran = re.findall(r"^workload (\S+): .* on (\S+) \((.*?)\)", output, flags=re.MULTILINE)
    if not ran:
        return False, "the bench printed no workload line"
    summary = "; ".join(f"{workload} on {backend} ({artifact})" for workload, backend, artifact in ran)
    others = [workload for workload, backend, _ in ran if backend != "tensorrt"]
    if others:
        return False, f"not on TensorRT: {summary} (the plan was passed over; the daemon's log says why)"
    return True, summary


# --- the steps ----------------------------------------------------------------------------------------


def write_bench_config(config_path: Path | None, folder: Path) -> Path:
    """The appliance config with inference.backend = "tensorrt", as absolute paths (it lives elsewhere)."""
    config = load_config(config_path)
    path = folder / "appliance-tensorrt.toml"
    path.write_text(
        f"[model]\ndir = {json.dumps(str(config.model.dir))}\n"
        f"engines_dir = {json.dumps(str(config.model.engines_dir))}\n\n"
        f'[inference]\nbackend = "tensorrt"\ndevice = {config.inference.device}\n',
        encoding="utf-8",
    )
    return path


def steps(bench_config: Path, config_path: Path | None = None) -> list[Step]:
    py = sys.executable
    gpu = gpu_problem
    trt = first_problem(tensorrt_problem, gpu_problem)
    cupy = module_problem("cupy", "pip install cupy-cuda12x or cupy-cuda13x, to match the driver")
    config_args = ["--config", str(config_path)] if config_path else []
    sanitizer = ["compute-sanitizer", "--error-exitcode", "1", "--tool", "memcheck"]
    out = [
        Step("gpu tests (pytest -m gpu)", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs"], gpu),
        Step(
            "stand-in TensorRT test under compute-sanitizer",
            [*sanitizer, py, "-m", "pytest", "-q", "-rs", STAND_IN_TEST],
            first_problem(tool_problem("compute-sanitizer"), gpu, cupy),
        ),
    ]
    builds = []
    for model in MODELS:
        name = f"TensorRT build of {Path(model).name}"
        builds.append(name)
        command = [py, "-m", "build_engine", *config_args, "--model", model, "--target", "tensorrt", "--force"]
        onnx = file_problem(REPO / model / "model.onnx", "run `make model`")
        out.append(Step(name, command, first_problem(onnx, trt)))
    out.append(
        Step(
            "make bench on TensorRT",
            ["make", "bench", f"CONFIG={bench_config}", f"PY={py}"],
            first_problem(trt, tool_problem("make")),
            needs=tuple(builds),
            judge=judge_bench,
        )
    )
    return out


# --- running and reporting ----------------------------------------------------------------------------


def run_step(step: Step, done: dict[str, Outcome]) -> Outcome:
    problem = step.problem()
    if problem:
        return Outcome(step.name, SKIPPED, problem)
    unmet = [name for name in step.needs if name not in done or done[name].result != RAN]
    if unmet:
        return Outcome(step.name, SKIPPED, f"needs {' and '.join(unmet)} to have run")
    print(f"\n=== {step.name}: {' '.join(step.command)}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    try:
        proc = subprocess.Popen(step.command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        return Outcome(step.name, FAILED, f"could not start {step.command[0]}: {e.strerror}")
    for line in proc.stdout or ():  # echoed as it comes: builds and the bench take minutes
        sys.stdout.write(line)
        tail.append(line)
    code = proc.wait()
    output = "".join(tail)
    if code != 0:
        return Outcome(step.name, FAILED, f"exit status {code}: {last_line(output)}")
    if step.judge is None:
        return Outcome(step.name, RAN, last_line(output))
    passed, why = step.judge(output)
    return Outcome(step.name, RAN if passed else FAILED, why)


def run_all(all_steps: Sequence[Step]) -> list[Outcome]:
    done: dict[str, Outcome] = {}
    for step in all_steps:
        done[step.name] = run_step(step, done)
    return list(done.values())


def report(outcomes: Sequence[Outcome]) -> str:
    width = max([len("step"), *(len(o.step) for o in outcomes)])
    lines = [f"{'step':<{width}}  {'result':<7}  why", f"{'-' * width}  {'-' * 7}  {'-' * 3}"]
    lines += [f"{o.step:<{width}}  {o.result:<7}  {o.why}" for o in outcomes]
    return "\n".join(lines)


def exit_status(outcomes: Sequence[Outcome]) -> int:
    return 1 if any(o.result == FAILED for o in outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m build_engine.gpu_check", description=__doc__)
    p.add_argument("--config", type=Path, help="appliance config whose model and engines folder to use")
    args = p.parse_args(argv)
    default = REPO / "appliance.toml"  # as `python -m build_engine` does without --config
    config = args.config.resolve() if args.config else (default if default.is_file() else None)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        outcomes = run_all(steps(write_bench_config(config, Path(folder)), config))
    print("\n" + report(outcomes))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
