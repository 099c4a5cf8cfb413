"""`make gpu-check`: the checks only a box with an NVIDIA GPU can run, in one command, then one report.

Each step is guarded: a step whose prerequisite is missing here (the GPU, TensorRT, CuPy,
compute-sanitizer, Triton with its TensorRT backend, a step before it) is skipped with the reason instead of
failing, so the same command runs on a CPU box, on a cloud image with a GPU but no TensorRT, and on a full
TensorRT host. The exit status is non-zero only when a step that could run failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.inference.artifacts import engines_folder, read_sidecar
from appliance.inference.backends import cuda
from appliance.inference.postprocess import activate
from appliance.toolkit import InferenceConfig, load_config, load_manifest, open_backend

REPO = Path(__file__).resolve().parents[1]
STAND_IN_TEST = "tests/gpu/test_tensorrt_slots.py"
MODELS = ("models/pipeline-test", "models/brain-mri-vgg16")
TRITON_MODEL = "models/pipeline-test"  # the small one: its plan is served by Triton's TensorRT backend
TRITON_STEP = "Triton serving pipeline-test's TensorRT plan"
TRITON_START_S = 300.0  # a plan loads in seconds; the first CUDA start on a cloud GPU can take minutes

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


def triton_server() -> Path | None:
    """`tritonserver`: the TRITON_SERVER environment variable, else the one on PATH."""
    named = os.environ.get("TRITON_SERVER") or shutil.which("tritonserver")
    return Path(named) if named else None


def triton_backends(server: Path) -> Path:
    """Its backend folder, beside its bin/ as Triton installs itself (/opt/tritonserver/backends)."""
    return server.resolve().parent.parent / "backends"


def triton_problem() -> str:
    server = triton_server()
    if server is None or not os.access(server, os.X_OK):
        return "tritonserver is not on PATH (nor in TRITON_SERVER)"
    if not (triton_backends(server) / "tensorrt").is_dir():
        return f"{server} has no tensorrt backend in {triton_backends(server)}"
    return ""


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
    out.append(
        Step(
            TRITON_STEP,
            [py, "-m", "build_engine.gpu_check", "--triton", *config_args],
            first_problem(triton_problem, trt),
            needs=(f"TensorRT build of {Path(TRITON_MODEL).name}",),
        )
    )
    return out


# --- the Triton step: the plan served by Triton's TensorRT backend, through the appliance's loader ------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tritonserver(server: Path, repository: Path, model: str, log: Path) -> Iterator[str]:
    """`server` on loopback in explicit model-control mode with ``model`` loaded; yields its gRPC address once it
    and the model are ready, and stops it (SIGTERM) at the end."""
    grpc_port, http_port = free_port(), free_port()
    command = [str(server), f"--model-repository={repository}", "--model-control-mode=explicit",
               f"--load-model={model}", f"--backend-directory={triton_backends(server)}",
               "--http-address=127.0.0.1", f"--http-port={http_port}", "--grpc-address=127.0.0.1",
               f"--grpc-port={grpc_port}", "--allow-metrics=false"]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TRITON_START_S
        pending = ["/v2/health/ready", f"/v2/models/{model}/ready"]
        while pending:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"tritonserver {'exited' if proc.poll() is not None else 'was not ready'}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{pending[0]}", timeout=5):
                    pending.pop(0)
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.2)  # starting: the server, then the model (no event to wait on from outside)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def triton_step(config_path: Path | None) -> int:
    """Export pipeline-test's TensorRT plan for Triton (`--target triton --source tensorrt`, into a temporary
    repository and a copy of its engines folder: the config's is left as it was), serve it from `tritonserver` on
    loopback, open it through the appliance's loader with inference.backend = "triton" (the export's self-check
    runs on the server as it joins) and score the self-check's gate images there once more."""
    server = triton_server()
    if server is None:
        print(triton_problem())
        return 1
    config = load_config(config_path)
    name = load_manifest(REPO / TRITON_MODEL).manifest.model.name
    with tempfile.TemporaryDirectory(prefix="gpu-check-triton-") as folder:
        work = Path(folder)
        engines = work / "engines"
        shutil.copytree(engines_folder(config.model.engines_dir, name), engines_folder(engines, name))
        config_args = ["--config", str(config_path)] if config_path else []
        export = [sys.executable, "-m", "build_engine", *config_args, "--model", str(REPO / TRITON_MODEL),
                  "--target", "triton", "--source", "tensorrt", "--repo", str(work / "repository"),
                  "--engines", str(engines)]  # fmt: skip
        if subprocess.run(export, cwd=REPO).returncode != 0:
            print("the export of the TensorRT plan for Triton failed (above)")
            return 1
        line, passed = score_on_triton(server, work / "repository", engines, config.inference.device, work)
    print(line)
    return 0 if passed else 1


def score_on_triton(server: Path, repository: Path, engines: Path, device: int, work: Path) -> tuple[str, bool]:
    """Serve the exported model from `server` and open it through the appliance's loader with inference.backend =
    "triton"; then score its self-check's gate images there, one a call as at build time. (one line, passed)"""
    loaded = load_manifest(REPO / TRITON_MODEL)
    name = loaded.manifest.model.name
    record = read_sidecar(engines_folder(engines, name) / f"triton-{name}.json")
    if record.self_check is None:
        return f"the export's record of {name} has no self-check", False
    check = np.load(engines_folder(engines, name) / record.self_check.file)
    with tritonserver(server, repository, name, work / "tritonserver.log") as address:
        chosen = InferenceConfig(backend="triton", device=device, triton={"endpoints": [address]})
        backend = open_backend(loaded, chosen, engines)
        try:
            if backend.name != "triton":
                return f"the server's model was refused, {backend.name} serves instead (the log above says why)", False
            worst = 0.0
            for row, expected in zip(check["inputs"], check["scores"], strict=True):
                out = backend.run(row[None])
                if out.ran_on:
                    return f"a gate image ran on {out.ran_on}, not on the server (the log above says why)", False
                got = activate(out.scores, loaded.manifest.output.activation)[0]
                worst = max(worst, float(np.abs(got - expected).max()))
        finally:
            backend.close()
    tolerance = record.self_check.tolerance
    passed = worst <= tolerance
    line = (
        f"{name}'s {record.key.precision} {Path(record.artifact or 'model').name} on tritonserver ({address}): "
        f"self-check passed as it joined, its {len(check['scores'])} gate images scored there again, max |diff| "
        f"{worst:.2g} ({'within' if passed else 'past'} {tolerance:g})"
    )
    return line, passed


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
    p.add_argument("--triton", action="store_true", help=f"run the step {TRITON_STEP!r} alone")
    args = p.parse_args(argv)
    default = REPO / "appliance.toml"  # as `python -m build_engine` does without --config
    config = args.config.resolve() if args.config else (default if default.is_file() else None)
    if args.triton:
        return triton_step(config)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        outcomes = run_all(steps(write_bench_config(config, Path(folder)), config))
    print("\n" + report(outcomes))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
