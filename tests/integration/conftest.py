"""Runs the real daemon as a subprocess on a free loopback port, with a temporary folder and SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from appliance.api.client import Connection, wait_until_serving
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.peers import require
from tests.peers.orthanc import Orthanc, RemoteAe
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
TEST_MODEL = REPO / "models" / "pipeline-test"
DEFAULT_MODEL = REPO / "models" / "brain-mri-vgg16"
APPLIANCE = "APPLIANCE"  # the daemon's AE title, as the DICOM tests' scanners and PACS know it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)


@dataclass
class Daemon:
    root: Path
    model: Path
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    # TLS and token for the test's own calls (ca, cert, key, token), where the daemon asks for them.
    credentials: dict[str, object] = field(default_factory=dict)

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def config_path(self) -> Path:
        return self.root / "appliance.toml"

    def write_config(self) -> None:
        sections: dict[str, dict[str, object]] = {
            "watch": {
                "dir": self.incoming,
                "processed_dir": self.processed,
                "rejected_dir": self.rejected,
                "stable_s": 0.2,
            },
            "storage": {"data_dir": self.root / "data"},
            "model": {"dir": self.model},
            "inference": {"threads": 1, "decode_workers": 2},
            "server": {"host": "127.0.0.1", "port": self.port, "metrics_port": 0},
            "logging": {"level": "INFO"},
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, wait: bool = True, under: list[str] | None = None) -> None:
        """``under``: a command the daemon runs under (strace ...), its own arguments after it."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self.write_config()
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(
            [*(under or []), sys.executable, "-m", "appliance.app.cli", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        proc = self.proc
        if not wait_until_serving(self.connection, lambda: proc.poll() is None, timeout):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log()}")
            raise AssertionError(f"daemon not ready after {timeout}s:\n{self.log()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def connection(self) -> Connection:
        return Connection(self.target, **self.credentials)  # type: ignore[arg-type]

    def channel(self) -> grpc.Channel:
        return self.connection.channel()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def collect(
        self, count: int, since: int = 0, timeout: float = 60.0, kinds: Sequence[pb.ResultKind.ValueType] = ()
    ) -> list[pb.Result]:
        """Read results of ``kinds`` (none named: image results) from the stream until ``count`` arrived (or fail
        with the log)."""
        out: list[pb.Result] = []
        with self.channel() as ch:
            stream = pb_grpc.ScoringStub(ch).StreamResults(
                pb.StreamResultsRequest(since_sequence=since, kinds=kinds), timeout=timeout
            )
            try:
                for r in stream:
                    out.append(r)
                    if len(out) >= count:
                        stream.cancel()
                        break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise AssertionError(
                        f"stream ended ({e.code().name}) with {len(out)}/{count} results:\n{self.log()[-4000:]}"
                    ) from e
        return out

    def status(self) -> pb.Status:
        with self.channel() as ch:
            return pb_grpc.ScoringStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)

    def settled(self, metrics_port: int, timeout: float = 60.0) -> pb.Status:
        """GetStatus once no input is in the stages (appliance_inputs_in_flight is 0): every input taken
        before then has its result, rejection or duplicate counted."""

        def in_flight() -> list[str]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            return [line for line in text.splitlines() if line.startswith("appliance_inputs_in_flight ")]

        eventually(
            in_flight,
            "no input in flight",
            until=lambda lines: "appliance_inputs_in_flight 0.0" in lines,
            timeout=timeout,
            context=lambda: self.log()[-4000:],
        )
        return self.status()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    class _Factory(Daemon):
        def __init__(self, model: Path = TEST_MODEL, **overrides: dict[str, object]) -> None:
            super().__init__(root=tmp_path, model=model, overrides=overrides)
            started.append(self)

    yield _Factory
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Publish a file the way careful senders do: write a temporary name, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    final = folder / name
    os.replace(tmp, final)
    return final


def png_bytes(seed: int, size: int = 96, bit16: bool = False, lesion: bool = False) -> bytes:
    """A unique synthetic grayscale image (content differs per seed, so each is a new input)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.3, 0.05, (size, size))
    if lesion:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
    img = np.clip(img, 0, 1)
    arr = (img * 65535).astype(np.uint16) if bit16 else (img * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def jpeg_bytes(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", arr)
    assert ok
    return buf.tobytes()


def bare_dicom(name: str) -> bytes:
    """A real DICOM file written the old way: no 128-byte preamble, no 'DICM', no file meta."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc as the clinic's PACS, knowing the daemon as APPLIANCE."""
    require("Orthanc")
    with Orthanc(tmp_path / "pacs", ae_title="PACS", modalities={"appliance": RemoteAe(APPLIANCE)}) as peer:
        yield peer
