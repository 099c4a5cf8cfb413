"""A real Triton Inference Server for the tests: the bare `tritonserver` of nvidia-pytriton's wheel, on loopback.

`make triton-peer` builds its virtualenv (tests/peers/install_triton.sh); elsewhere each test that needs it is skipped
with one line saying how to build it. The wheel has only Triton's python backend: the server gets a backend folder
assembled from it and our Python-based `onnxruntime` backend (tests/peers/triton_backends/), so a repository exported
for a production Triton (`platform: "onnxruntime_onnx"`) loads unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.peers import dies_with_parent, free_port
from tests.waiting import eventually

INSTALL = "make triton-peer"
TRITON_VENV = Path(os.environ.get("APPLIANCE_TRITON_VENV") or Path(__file__).resolve().parents[2] / ".venv-triton")
SHIM_BACKENDS = Path(__file__).resolve().parent / "triton_backends"
MARK = ".triton-peer"  # install_triton.sh writes its pins there once the virtualenv is complete

START_TIMEOUT_S = 60.0  # ready in about 2 s; a broken library path makes a model load hang, not fail
STOP_TIMEOUT_S = 45.0  # a clean stop takes about 2-4 s; Triton waits up to 30 s for in-flight inferences
REST_TIMEOUT_S = 30.0
_SHIM_BATCH = re.compile(r"shim batch (\d+)")


class TritonError(RuntimeError):
    """Triton did not start or stop, or its HTTP API answered an error."""


def _server_root(venv: Path) -> Path | None:
    """The wheel's `tritonserver` folder in the virtualenv, or None."""
    found = sorted(venv.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    return found[0] if found else None


def triton_missing(venv: Path = TRITON_VENV) -> str | None:
    """The one-line reason to skip where the peer's virtualenv or its `tritonserver` is absent, else None."""
    if not (venv / MARK).is_file() or (venv / MARK).read_text().strip() == "building":
        return f"Triton peer missing (no complete virtualenv at {venv}): {INSTALL}"
    root = _server_root(venv)
    if root is None or not os.access(root / "bin" / "tritonserver", os.X_OK):
        return f"Triton peer missing (no tritonserver in {venv}): {INSTALL}"
    return None


def require_triton() -> None:
    """Skip the calling test, with the line to build the peer, unless it is here."""
    reason = triton_missing()
    if reason:
        pytest.skip(reason)


_REASON = triton_missing()
needs_triton = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
"""For a test or a module: `pytestmark = [pytest.mark.slow, needs_triton]`."""


@dataclass(frozen=True)
class _Interpreter:
    """What the backend stub needs of the virtualenv's Python, asked of that Python itself."""

    version: str  # "3.11": picks the wheel's stub built for it
    libdir: str  # where its libpython is: the stub would load the system's otherwise
    site: str  # its site-packages: the shim puts it first on sys.path


@cache
def _interpreter(venv: Path) -> _Interpreter:
    script = (
        "import json, sys, sysconfig; print(json.dumps([f'{sys.version_info[0]}.{sys.version_info[1]}',"
        " sysconfig.get_config_var('LIBDIR'), sysconfig.get_path('purelib')]))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    version, libdir, site = json.loads(out.stdout)
    return _Interpreter(version, libdir, site)


@dataclass
class _Process:
    """The running server, apart from the `Triton` object, so a finalizer can reap it without keeping that alive."""

    shm_prefix: str  # each stub's region in /dev/shm is named <shm_prefix><uuid>
    stub: Path  # the backend stub program the server runs: its processes are found by it
    temporary: Path | None  # the folder made for a Triton given no root, removed at the end
    proc: subprocess.Popen[bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kill(self) -> None:
        """SIGKILL the server, then what it leaves: its backend stubs (its process group) and their shared memory."""
        with self.lock:
            proc = self.proc
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                self._reap_group(proc.pid)
            self._remove_shm()

    def after_exit(self) -> None:
        """After a clean exit: the stubs end with the server; kill any that did not, and remove their memory."""
        with self.lock:
            if self.proc is not None:
                self._reap_group(self.proc.pid)
            self._remove_shm()

    def finalize(self) -> None:
        self.kill()
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)

    def _reap_group(self, pgid: int) -> None:
        # The server leads its own process group (start_new_session); each model instance's
        # `triton_python_backend_stub` is its child in that group and notices its death only after a poll.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        eventually(lambda: not stub_pids(self.stub), "the backend stubs gone", timeout=STOP_TIMEOUT_S)

    def _remove_shm(self) -> None:
        # A stub unlinks its region when it notices its server gone; a stub killed cannot.
        for path in Path("/dev/shm").glob(self.shm_prefix + "*"):
            path.unlink(missing_ok=True)


class Triton:
    """`tritonserver` in explicit model-control mode on free 127.0.0.1 ports (gRPC, HTTP, metrics), serving
    `repository` with `models` loaded at start, its log in `root` (a temporary folder when None).

    `with Triton(repo, ["pipeline-test"]) as server:` starts it, waits until it and each model are ready, and kills
    it at the end. `stop()` or `kill()` then `start()` restart it on the same ports. gRPC over TLS with `tls_cert` and
    `tls_key` (PEM paths); with `tls_client_ca` too, clients must present a certificate that CA signed.
    """

    def __init__(
        self,
        repository: Path,
        models: Sequence[str] = (),
        *,
        root: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        venv: Path = TRITON_VENV,
    ) -> None:
        if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
            raise ValueError("TLS needs both tls_cert and tls_key (and tls_client_ca only with them)")
        self.repository = repository
        self.models = list(models)
        self.tls_cert, self.tls_key, self.tls_client_ca = tls_cert, tls_key, tls_client_ca
        self.venv = venv
        temporary = None
        if root is None:
            root = temporary = Path(tempfile.mkdtemp(prefix="triton-"))
        self.root = root
        self.grpc_port = self.http_port = self.metrics_port = 0
        # One prefix per server, so its leftovers in /dev/shm are found and no other's are touched.
        prefix = f"appliance_triton_{uuid.uuid4().hex[:12]}_"
        self._state = _Process(prefix, self.backend_directory / "python" / "triton_python_backend_stub", temporary)
        self._finalizer = weakref.finalize(self, self._state.finalize)

    # --- addresses and state

    @property
    def grpc_address(self) -> str:
        """Where its gRPC endpoint is, `127.0.0.1:port` (TLS where it was given `tls_cert`)."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr, all its runs appended."""
        return self.root / "tritonserver.log"

    @property
    def backend_directory(self) -> Path:
        return self.root / "backends"

    @property
    def running(self) -> bool:
        proc = self._state.proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def shm_prefix(self) -> str:
        """The start of the name of each shared-memory region its backend stubs map in /dev/shm."""
        return self._state.shm_prefix

    def shm_regions(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(self.shm_prefix + "*"))

    def stub_pids(self) -> list[int]:
        """The processes running its backend stub (`triton_python_backend_stub`, one per model instance)."""
        return stub_pids(self._state.stub)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        # Triton prints its option and model tables at start: the lines that say what happened are the others.
        text = [line for line in self.log_path.read_text(errors="replace").splitlines() if line[:1] not in "+|"]
        return "\n".join(text[-lines:])

    def batch_sizes(self) -> list[int]:
        """Each `execute()` of the shim backend so far, the rows it ran at once (more than one request's where
        dynamic batching merged them), from the server's log."""
        if not self.log_path.exists():
            return []
        return [int(m.group(1)) for m in _SHIM_BATCH.finditer(self.log_path.read_text(errors="replace"))]

    # --- the process

    def command(self) -> list[str]:
        """The command line it starts with."""
        root = _server_root(self.venv)
        if root is None:
            raise TritonError(triton_missing(self.venv) or f"no tritonserver in {self.venv}")
        loopback = "127.0.0.1"  # Triton listens on all interfaces by default
        command = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.models),
            f"--backend-directory={self.backend_directory}",
            f"--backend-config=python,shm-region-prefix-name={self._state.shm_prefix}",
            f"--http-address={loopback}",
            f"--http-port={self.http_port}",
            f"--grpc-address={loopback}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={loopback}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
        ]
        if self.tls_cert is not None and self.tls_key is not None:
            command += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.tls_cert}",
                f"--grpc-server-key={self.tls_key}",
            ]
            if self.tls_client_ca is not None:
                command += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.tls_client_ca}"]
        return command

    def environment(self) -> dict[str, str]:
        """The environment it starts with: the stub must load the virtualenv's libpython (the system's one breaks
        its threading) and the wheel's libraries (the copied python backend cannot find them beside itself)."""
        python = _interpreter(self.venv)
        root = _server_root(self.venv)
        assert root is not None  # command() checked
        libraries = [python.libdir, str(root.parent.parent / "nvidia_pytriton.libs")]
        if os.environ.get("LD_LIBRARY_PATH"):
            libraries.append(os.environ["LD_LIBRARY_PATH"])
        return {**os.environ, "LD_LIBRARY_PATH": ":".join(libraries), "APPLIANCE_TRITON_SITE": python.site}

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        """Start it and return once it and each of its models are ready. The first start picks the ports; later
        ones reuse them."""
        if self.running:
            raise TritonError("Triton is already running")
        fresh = self.http_port == 0
        self._assemble_backends()
        for attempt in range(3 if fresh else 1):
            if fresh:
                ports: set[int] = set()
                while len(ports) < 3:
                    ports.add(free_port())
                self.grpc_port, self.http_port, self.metrics_port = sorted(ports)
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _ExitedEarly:
                self._state.after_exit()
                # A port picked free may be taken by the time Triton binds it: pick others.
                if not fresh or attempt == 2 or "already in use" not in self.log_tail(5):
                    raise TritonError(f"Triton exited on start: {self.log_tail()}") from None
        raise AssertionError("unreachable")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """A clean stop: SIGTERM, then wait until it has exited (its in-flight inferences answered)."""
        proc = self._state.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._state.kill()
            raise TritonError(f"Triton did not stop within {timeout:.0f} s of SIGTERM; killed") from None
        self._state.after_exit()

    def kill(self) -> None:
        """SIGKILL, as a crash: then its backend stubs are killed and their shared memory removed."""
        self._state.kill()

    def close(self) -> None:
        """Kill it and remove the temporary folder it was given none."""
        self._finalizer()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _assemble_backends(self) -> None:
        # Triton refuses a backend library reached through a symlink out of its folder, so the python backend is
        # copied; the stub is the one built for the virtualenv's Python. Each shim folder is a Python-based backend.
        server = _server_root(self.venv)
        if server is None:
            raise TritonError(triton_missing(self.venv) or f"no tritonserver in {self.venv}")
        python = self.backend_directory / "python"
        if python.is_dir():
            return
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(server / "backends" / "python" / name, python / name)
        stub = server / "python_backend_stubs" / _interpreter(self.venv).version / "triton_python_backend_stub"
        shutil.copy2(stub, python / stub.name)
        for shim in sorted(SHIM_BACKENDS.iterdir()):
            if (shim / "model.py").is_file():
                (self.backend_directory / shim.name).mkdir()
                shutil.copy2(shim / "model.py", self.backend_directory / shim.name / "model.py")

    def _spawn(self) -> None:
        command, env = self.command(), self.environment()
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._state.proc = subprocess.Popen(
                [*dies_with_parent(), *command],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its stubs join its group: kill() finds them there
            )

    def _wait_ready(self, timeout: float) -> None:
        paths = ["/v2/health/ready", *(f"/v2/models/{model}/ready" for model in self.models)]

        def ready() -> bool:
            if not self.running:
                raise _ExitedEarly
            for path in paths:
                self._call("GET", path)
            return True

        try:
            eventually(
                ready, "Triton and its models ready", timeout=timeout, every=0.05, ignoring=(OSError, TritonHttpError)
            )
        except AssertionError:
            self._state.kill()
            raise TritonError(f"Triton was not ready within {timeout:.0f} s: {self.log_tail()}") from None

    # --- model control and HTTP (standard library only)

    def load(self, model: str) -> None:
        """Load (or reload) a model from the repository; returns once it is ready."""
        self._call("POST", f"/v2/repository/models/{model}/load", {})

    def unload(self, model: str) -> None:
        self._call("POST", f"/v2/repository/models/{model}/unload", {})

    def get(self, path: str) -> Any:
        """A GET on the HTTP API (`/v2/models/pipeline-test/config`), its JSON decoded."""
        return self._call("GET", path)

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=REST_TIMEOUT_S) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise TritonHttpError(e.code, f"Triton answered {e.code} to {method} {path}: {detail}") from e
        return json.loads(raw) if raw else None


def stub_pids(stub: Path) -> list[int]:
    """The processes running this backend stub program (a zombie's command line reads empty: not counted)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue  # gone meanwhile
            if argv0 == os.fsencode(stub):
                pids.append(int(entry.name))
    return sorted(pids)


class TritonHttpError(TritonError):
    """Triton's HTTP API answered an error status (`status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ExitedEarly(Exception):
    pass
