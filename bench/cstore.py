"""The radiograph burst through the DICOM way in: DCMTK's storescu (the scanner) pushes it to the daemon's
receiver on one association; then again with [pacs] on, the reports going to a stand-in PACS the bench serves.
Each run has a fresh daemon (its own journal: the same instances are never duplicates), warmed up first.
storescu runs on this host, so its CPU competes with the daemon's, where a real scanner's would not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event, EventHandlerType

from bench.daemon_run import DICOM_AE, PACS_AE, SCANNER_AE, BenchDaemon, free_port

MISSING = "storescu missing: sudo apt-get install dcmtk"
SUCCESS = 0x0000
RESULTS_WAIT_S = 600.0  # after storescu has every acknowledgement, every instance is journaled: results follow
SEND_WAIT_S = 3600.0  # storescu, for the whole burst
REPORTS_WAIT_S = 120.0  # after the last result, for the outbox to deliver the last report


def find_storescu() -> str | None:
    """DCMTK's storescu: /usr/bin first, then each folder on PATH. pynetdicom installs a `storescu` of its own
    (in the venv's bin), a Python SCU and not the scanner measured here, so a candidate must say it is DCMTK's."""
    for folder in ["/usr/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        candidate = Path(folder or ".") / "storescu"
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_dcmtk(candidate):
            return str(candidate)
    return None


def _is_dcmtk(program: Path) -> bool:
    try:
        done = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "$dcmtk:" in done.stdout  # "$dcmtk: storescu v3.6.7 2022-04-22 $"


@dataclass(frozen=True)
class Sent:
    started: float  # time.time() as storescu started (the association, then the first file)
    acknowledged: float  # as it exited: every instance answered, all the scanner waits for


def send(storescu: str, port: int, paths: Sequence[Path], called: str = DICOM_AE) -> Sent:
    """The files, in order, on one association to ``called`` (the daemon's receiver, or a PACS); an error with
    storescu's words if it failed."""
    command = [storescu, "-aet", SCANNER_AE, "-aec", called, "127.0.0.1", str(port), *map(str, paths)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=SEND_WAIT_S)
    acknowledged = time.time()
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:] or "no output; a store was refused (-v says which)"
        raise RuntimeError(f"storescu exited with {done.returncode}: {said}")
    return Sent(started, acknowledged)


class StandInPacs:
    """A PACS that keeps nothing: a pynetdicom Storage SCP in the bench's process that answers every C-STORE
    with success, so what is measured is the daemon making and sending its reports, not a PACS storing them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[float] = []  # time.time() of each C-STORE
        self._cond = threading.Condition()
        self._ae = AE(ae_title=PACS_AE)
        self._ae.supported_contexts = StoragePresentationContexts
        self._server: Any = None

    def start(self) -> None:
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._on_store)]
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _on_store(self, event: Event) -> int:
        with self._cond:
            self.received.append(time.time())
            self._cond.notify_all()
        return SUCCESS

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= count, timeout)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def _scored(daemon: BenchDaemon) -> int:
    return sum(1 for a in daemon.arrivals if not a.result.rejection.code)


def burst(
    make_daemon: Callable[..., BenchDaemon],
    root: Path,
    storescu: str,
    warm: Sequence[Path],
    files: Sequence[Path],
    pacs: StandInPacs | None = None,
    per_result: int = 1,
) -> dict[str, Any]:
    """One daemon: the warm-up sent and scored (and its reports delivered) untimed, then the burst.
    ``per_result``: the objects the PACS gets for each scored image (its report, and its heatmap overlay): a report
    per image, as each radiograph here is a series of its own (bench/series.py measures a report per series)."""
    daemon = make_daemon(root=root, dicom=True, pacs_port=pacs.port if pacs else None, report_per="image")
    daemon.start()
    try:
        if warm:
            send(storescu, daemon.dicom_port, warm)
            daemon.wait_for(len(warm), RESULTS_WAIT_S)
        if pacs is not None and not pacs.wait_for(per_result * _scored(daemon), REPORTS_WAIT_S):
            raise RuntimeError(
                f"the stand-in PACS got {len(pacs.received)} of the warm-up's {per_result * _scored(daemon)} objects"
            )
        cpu_before = daemon.cpu_seconds()
        sent = send(storescu, daemon.dicom_port, files)
        daemon.wait_for(len(warm) + len(files), RESULTS_WAIT_S)
        cpu_s = daemon.cpu_seconds() - cpu_before
        if pacs is not None:
            pacs.wait_for(per_result * _scored(daemon), REPORTS_WAIT_S)
    finally:
        daemon.stop()
    last = max(a.at for a in daemon.arrivals[len(warm) :])
    figures: dict[str, Any] = {
        "e2e_files_s": len(files) / (last - sent.started),
        "latency_s": last - sent.started,
        "storescu_s": sent.acknowledged - sent.started,
        "daemon_cpu_ms_per_file": cpu_s * 1e3 / len(files),
        "rejected": len(daemon.arrivals) - _scored(daemon),
    }
    figures["ratio_storescu_to_latency"] = figures["storescu_s"] / figures["latency_s"]
    if figures["rejected"]:
        print(f"warning: {figures['rejected']} C-STORE inputs were rejected ({root / 'daemon.log'})", file=sys.stderr)
    if pacs is not None:
        figures["reports_expected"], figures["reports_received"] = per_result * _scored(daemon), len(pacs.received)
        figures["last_report_after_last_result_s"] = max(pacs.received) - last if pacs.received else None
    shutil.rmtree(root, ignore_errors=True)  # its spool and journal: space for the next run
    return figures


def measure(
    make_daemon: Callable[..., BenchDaemon],
    work: Path,
    warm: Sequence[Path],
    files: Sequence[Path],
    folder: dict[str, Any],
    with_pacs: bool = True,
    per_result: int = 1,
) -> dict[str, Any]:
    """The C-STORE figures beside the folder's (its e2e files/s and CPU per file): {"cstore": ..., and with
    a PACS "cstore_pacs": ...}; only {"cstore": {"skipped": why}} where DCMTK is missing."""
    storescu = find_storescu()
    if storescu is None:
        print(MISSING, flush=True)
        return {"cstore": {"skipped": MISSING}}
    print("C-STORE: storescu pushes the same burst to the DICOM receiver ...", flush=True)
    plain = burst(make_daemon, work / "daemon-cstore", storescu, warm, files)
    plain["storescu"] = storescu
    plain["ratio_e2e_to_folder"] = plain["e2e_files_s"] / folder["e2e_files_s"]
    plain["ratio_cpu_to_folder"] = plain["daemon_cpu_ms_per_file"] / folder["daemon_cpu_ms_per_file"]
    out: dict[str, Any] = {"cstore": plain}
    if with_pacs:
        print("C-STORE again, with [pacs] on: reports to a stand-in PACS ...", flush=True)
        pacs = StandInPacs()
        pacs.start()
        try:
            reported = burst(make_daemon, work / "daemon-pacs", storescu, warm, files, pacs, per_result)
        finally:
            pacs.stop()
        reported["ratio_e2e_to_cstore"] = reported["e2e_files_s"] / plain["e2e_files_s"]
        reported["ratio_cpu_to_cstore"] = reported["daemon_cpu_ms_per_file"] / plain["daemon_cpu_ms_per_file"]
        out["cstore_pacs"] = reported
    return out
