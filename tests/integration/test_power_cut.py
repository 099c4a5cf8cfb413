"""An acknowledged Score upload, or C-STORE, survives a power cut: its spooled copy's bytes, its name and the spool
folder's entry for it are on the disk before the answer, as the real daemon's system calls (strace) show against
the client's clock. A cut after the answer can lose neither the data nor the name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.syscalls import durable_write, in_order, strace, threads

from .conftest import Daemon, free_port, png_bytes


def _start_traced(d: Daemon, traces: Path) -> None:
    """The real daemon, started as every test starts it, as strace's child."""
    d.start(under=[*strace(traces), "--"])


def _stop_traced(d: Daemon) -> int:
    """SIGTERM to the daemon itself (strace's child): strace then ends with the daemon's exit status."""
    assert d.proc is not None
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGTERM)
    return d.proc.wait(timeout=60)


def test_an_acknowledged_score_upload_is_on_disk_before_its_answer(make_daemon: type[Daemon], tmp_path: Path) -> None:
    traces = tmp_path / "strace"
    d = make_daemon()
    _start_traced(d, traces)
    image = png_bytes(4242)
    with d.channel() as ch:
        sent = time.time()
        answer = pb_grpc.ScoringStub(ch).Score(pb.ScoreRequest(image=image, file_name="scan.png"), timeout=120)
        answered = time.time()
    assert answer.outcome == pb.OUTCOME_SCORED
    assert _stop_traced(d) == 0, d.log()[-4000:]

    spool = os.path.realpath(d.root / "data" / "spool")
    [handler] = [t for t in threads(traces) if any(c.call.startswith("rename") and spool in c.args for c in t)]
    # On the handler's thread, in order: the bytes written, fsynced, renamed into place, the folder fsynced ...
    writes, synced, rename, folder_synced = durable_write(handler, spool)
    assert sum(c.result for c in writes) == len(image) and writes[0].start >= sent
    # ... and all of it finished before the client had its answer: a power cut after it keeps the upload.
    assert folder_synced.end <= answered, (folder_synced, answered)
    print(f"Score sent at {sent:.6f}, answered at {answered:.6f}; on the handler's thread:")
    for c in [*writes, synced, rename, folder_synced]:
        print(f"  {c.start:.6f}-{c.end:.6f} {c.call}({c.args}) = {c.result}")


def test_an_acknowledged_c_store_is_on_disk_before_its_answer(make_daemon: type[Daemon], tmp_path: Path) -> None:
    traces = tmp_path / "strace"
    port = free_port()
    d = make_daemon(dicom={"enabled": True, "port": port, "ae_title": "APPLIANCE", "allowed": [{"ae_title": "CT"}]})
    _start_traced(d, traces)
    instance = dcmread(get_testdata_file("CT_small.dcm"))
    scanner = AE(ae_title="CT")
    scanner.add_requested_context(instance.SOPClassUID, instance.file_meta.TransferSyntaxUID)
    assoc = scanner.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        sent = time.time()
        status = assoc.send_c_store(instance)
        answered = time.time()
    finally:
        assoc.release()
    assert int(status.Status) == 0x0000, status
    assert _stop_traced(d) == 0, d.log()[-4000:]

    spool = os.path.realpath(d.root / "data" / "spool")
    # Written as it arrives, on the association's reader; fsynced, renamed and the folder fsynced by its handler.
    writes, _, rename, folder_synced = durable_write(in_order(traces), spool)
    assert rename.paths[-1].endswith(".dcm") and writes[0].start >= sent
    assert folder_synced.end <= answered, (folder_synced, answered)
