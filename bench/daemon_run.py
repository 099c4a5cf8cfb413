"""The real daemon on a free loopback port, fed through its watch folder and read from its gRPC stream."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from appliance.api.client import wait_until_serving
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

DICOM_AE = "APPLIANCE"  # the daemon's receiver
SCANNER_AE = "BENCH"  # the only caller it allows: storescu
PACS_AE = "BENCHPACS"  # the stand-in PACS the reports go to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int) -> list[int]:
    """A process and its descendants (for the daemon: the forkserver and the decode workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])  # after the name
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree


def cpu_seconds_of(pids: list[int]) -> float:
    """User and system CPU time these processes have used so far (all threads; those gone meanwhile count 0)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Arrival:
    file_name: str
    at: float  # time.time() when the result came off the stream
    result: pb.Result


@dataclass
class BenchDaemon:
    root: Path
    model: Path
    engines: Path
    max_delay_ms: float = 5.0
    decode_workers: int = 0
    decode_with: str = "processes"
    backend: str = "auto"  # the config's inference.backend: `make gpu-check` benches TensorRT by name
    heatmaps: bool = True  # the config's inference.heatmaps
    device: int = 0
    dicom: bool = False  # the DICOM receiver on too, for callers titled SCANNER_AE
    pacs_port: int | None = None  # [pacs] on: reports go to a PACS_AE on this loopback port
    report_per: str = "series"  # pacs.report_per: "series" (the config's default) or "image"
    series_stable_s: float | None = None  # [series] stable_s; None: the config's default
    build_on_start: bool = False  # inference.build_on_start: bench/build_cost.py's daemon builds while it serves
    endpoints: tuple[str, ...] = ()  # [inference.triton] endpoints: the inference servers of backend "triton"
    port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    arrivals: list[Arrival] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None
    _channel: grpc.Channel | None = None

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def start(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.incoming.mkdir(parents=True)
        workers = self.decode_workers or os.cpu_count() or 2
        config = self.root / "appliance.toml"
        ways = ""
        if self.dicom:
            ways += (
                f'[dicom]\nenabled = true\nhost = "127.0.0.1"\nport = {self.dicom_port}\nae_title = "{DICOM_AE}"\n'
                f'allowed = [{{ ae_title = "{SCANNER_AE}" }}]\n'
            )
        if self.pacs_port is not None:
            ways += (
                f'[pacs]\nenabled = true\nhost = "127.0.0.1"\nport = {self.pacs_port}\nae_title = "{PACS_AE}"\n'
                f'report_per = "{self.report_per}"\n'
            )
        if self.series_stable_s is not None:
            ways += f"[series]\nstable_s = {self.series_stable_s}\n"
        if self.endpoints:
            ways += f"[inference.triton]\nendpoints = {json.dumps(list(self.endpoints))}\n"
        config.write_text(
            f'[watch]\ndir = "{self.incoming}"\nprocessed_dir = "{self.root / "processed"}"\nstable_s = 0.2\n'
            f'rejected_dir = "{self.root / "rejected"}"\n'
            f'[storage]\ndata_dir = "{self.root / "data"}"\n'
            f'[model]\ndir = "{self.model}"\nengines_dir = "{self.engines}"\n'
            f"[inference]\nmax_delay_ms = {self.max_delay_ms}\ndecode_workers = {workers}\n"
            f'backend = "{self.backend}"\ndevice = {self.device}\nheatmaps = {str(self.heatmaps).lower()}\n'
            f'decode_with = "{self.decode_with}"\n'
            + ("build_on_start = true\n" if self.build_on_start else "")
            + f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nmetrics_port = 0\n'
            '[logging]\nlevel = "WARNING"\n' + ways
        )
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.app.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self._wait_ready()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float = 120) -> None:
        assert self.proc is not None
        proc = self.proc
        if not wait_until_serving(f"127.0.0.1:{self.port}", lambda: proc.poll() is None, timeout):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {(self.root / 'daemon.log').read_text()[-2000:]}")
            raise RuntimeError("the daemon did not become ready")

    def _read(self) -> None:
        assert self._channel is not None
        stream = pb_grpc.ScoringStub(self._channel).StreamResults(pb.StreamResultsRequest(since_sequence=0))
        try:
            for result in stream:
                with self._cond:
                    self.arrivals.append(Arrival(result.file_name, time.time(), result))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass

    def stage(self, source: Path, name: str) -> Path:
        """Write a file beside the watch folder, on the same file system, as a careful sender does before
        it publishes: the copying is the sender's work, so it is done before the clock starts."""
        staged = self.root / "staging" / name
        staged.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, staged)
        return staged

    def publish(self, staged: Path) -> float:
        """Rename a staged file into the watch folder; returns that moment, the file's close as the daemon
        sees it."""
        os.replace(staged, self.incoming / staged.name)
        return time.time()

    def wait_for(self, count: int, timeout: float = 3600) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise RuntimeError(f"only {len(self.arrivals)} of {count} results arrived")

    def peak_rss_mb(self) -> float:
        """The sum of each process's peak resident memory: the daemon and its workers (an upper bound
        on the peak of the whole, as the peaks need not coincide)."""
        kb = sum(int(line.split()[1]) for text in self._tree_files("status") for line in text.splitlines()
                 if line.startswith("VmHWM:"))  # fmt: skip
        return kb / 1024

    def status(self) -> pb.Status:
        assert self._channel is not None
        return pb_grpc.ScoringStub(self._channel).GetStatus(pb.GetStatusRequest(), timeout=10)

    def cpu_seconds(self) -> float:
        """User and system CPU time the daemon and its worker processes have used so far (all threads)."""
        assert self.proc is not None
        return cpu_seconds_of(process_tree(self.proc.pid))

    def _tree_files(self, name: str) -> list[str]:
        """/proc/<pid>/<name> of the daemon and each of its descendants still running."""
        assert self.proc is not None
        texts = []
        for pid in process_tree(self.proc.pid):
            try:
                texts.append(Path(f"/proc/{pid}/{name}").read_text())
            except OSError:
                continue  # exited meanwhile
        return texts

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
