"""The series workload: one CT-like series pushed by DCMTK's storescu (the scanner) to the daemon's receiver with
[pacs] on and a real Orthanc as the PACS. Per series: how long after the scanner's last slice the series' report is
in the PACS (beside series.stable_s), what the PACS gets (objects by modality and bytes) against a report per image
in the same run, and the scanner's wait against the same series sent straight to an Orthanc.

Each run has a fresh Orthanc and a fresh daemon (its own journal: the same slices are never duplicates). All run on
this host, so storescu's, Orthanc's and the daemon's CPU compete, where a scanner's and a PACS's would not."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from bench.cstore import MISSING, RESULTS_WAIT_S, find_storescu, send
from bench.daemon_run import PACS_AE, SCANNER_AE, BenchDaemon
from tests.peers import missing
from tests.peers.orthanc import Orthanc, RemoteAe

APPLIANCE_AE = "APPLIANCE"  # pacs.calling_ae_title's default: the daemon's AE title as the PACS knows it
SIZE = 512
MARKED = 3  # slices mid-series with a soft bright nodule (pipeline-test, not a CT model, scores the whole body)
POLL_S = 0.05  # how often the PACS's count is looked at: the delivery time's resolution
DELIVERY_WAIT_S = 600.0  # after the last image result: stable_s, the series' objects made, then sent


def write_series(folder: Path, count: int, seed: int = 11) -> list[Path]:
    """``count`` axial slices of one CT series in one study: 512 x 512, 12 bits stored in 16 (HU = value - 1024),
    a soft-tissue window; body, lungs and spine changing along the series, and fresh noise on each slice (no two
    are duplicates). No Images in Acquisition, as from most scanners: the series completes after series.stable_s."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    y, x = np.mgrid[-1 : 1 : SIZE * 1j, -1 : 1 : SIZE * 1j].astype(np.float32)
    marked = set(range(count // 2 - MARKED // 2, count // 2 - MARKED // 2 + MARKED))
    paths = []
    for i in range(count):
        z = i / max(count - 1, 1)
        lung = 0.6 + 0.4 * np.sin(np.pi * z)  # lungs widest mid-series
        hu = np.full((SIZE, SIZE), -1000.0, np.float32)
        hu[(x / (0.85 + 0.05 * z)) ** 2 + (y / 0.65) ** 2 < 1] = 40.0
        for side in (-1, 1):
            hu[((x - 0.38 * side) / (0.25 * lung)) ** 2 + ((y + 0.05) / (0.35 * lung)) ** 2 < 1] = -850.0
        hu[x**2 + (y - 0.45) ** 2 < 0.08**2] = 700.0
        if i in marked:
            hu += 160.0 * np.exp(-((x - 0.15) ** 2 + (y - 0.2) ** 2) / (2 * 0.08**2))
        smooth = cv2.GaussianBlur(hu, (0, 0), 1.5) + rng.normal(0, 12, hu.shape)
        stored = np.clip(np.round(smooth + 1024), 0, 4095).astype(np.uint16)
        path = folder / f"ct-{i:05d}.dcm"
        _slice(stored, i, study, series, frame).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_warm(folder: Path) -> Path:
    """A 16-bit PNG for the folder: it warms the daemon's workers and model and joins no series."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "warm.png"
    cv2.imwrite(str(path), np.random.default_rng(3).integers(0, 65535, (SIZE, SIZE), dtype=np.uint16))
    return path


def _slice(pixels: np.ndarray, index: int, study: str, series: str, frame: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "BENCH^SYNTHETIC", "BENCH", "BENCHCT1"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240101", "120000", 2, index + 1
    ds.ImagePositionPatient = [-250.0, -250.0, -1.25 * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness, ds.SliceLocation = [0.9765625, 0.9765625], 1.25, -1.25 * index
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.tobytes()
    return ds


def pacs(root: Path) -> Orthanc:
    """A fresh Orthanc (started) taking C-STOREs from the scanner and from the daemon; quiet, as a PACS's log is."""
    modalities = {"scanner": RemoteAe(SCANNER_AE), "appliance": RemoteAe(APPLIANCE_AE)}
    return Orthanc(root, ae_title=PACS_AE, modalities=modalities, verbose=False).start()


def contents(orthanc: Orthanc) -> dict[str, Any]:
    """What the PACS holds: objects and bytes (Orthanc's FileSize: the DICOM files as stored), by modality."""
    modality = {s["ID"]: s["MainDicomTags"].get("Modality", "?") for s in orthanc.get("/series?expand")}
    by: dict[str, dict[str, int]] = defaultdict(lambda: {"objects": 0, "bytes": 0})
    for instance in orthanc.get("/instances?expand"):
        entry = by[modality[instance["ParentSeries"]]]
        entry["objects"] += 1
        entry["bytes"] += int(instance["FileSize"])
    return {
        "objects": sum(e["objects"] for e in by.values()),
        "bytes": sum(e["bytes"] for e in by.values()),
        "by_modality": dict(sorted(by.items())),
    }


class SeriesFeed:
    """The daemon's series results as they come off its stream (the image results are BenchDaemon's)."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ScoringStub(self.channel)
        self.results: list[tuple[float, pb.SeriesResult]] = []  # time.time() it arrived, the result
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        request = pb.StreamResultsRequest(since_sequence=0, kinds=[pb.RESULT_KIND_SERIES])
        try:
            for result in self.stub.StreamResults(request):
                with self._cond:
                    self.results.append((time.time(), result.series))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass  # closed at the end

    def status(self) -> pb.Status:
        return self.stub.GetStatus(pb.GetStatusRequest(), timeout=30)

    def close(self) -> None:
        self.channel.close()


@dataclass(frozen=True)
class Delivered:
    at: float  # time.time() the PACS first held all it finally held
    feed: list[tuple[float, pb.SeriesResult]]
    last_status: pb.Status


def wait_delivered(feed: SeriesFeed, orthanc: Orthanc, timeout: float = DELIVERY_WAIT_S) -> Delivered:
    """Poll the PACS's count of instances until the series' result is out and the outbox is empty (then all it
    will get is in), and return when its final count was first seen."""
    deadline = time.time() + timeout
    count, seen_at = -1, time.time()
    while True:
        now = time.time()
        held = int(orthanc.get("/statistics")["CountInstances"])
        if held != count:
            count, seen_at = held, now
        status = feed.status()
        if feed.results and status.outbox_pending == 0 and status.open_series == 0:
            if int(orthanc.get("/statistics")["CountInstances"]) != count:
                continue  # one more arrived between the two looks: look again
            return Delivered(seen_at, list(feed.results), status)
        if now > deadline:
            raise RuntimeError(
                f"no series delivered within {timeout:.0f} s: {len(feed.results)} series results, "
                f"{status.outbox_pending} objects in the outbox, {status.open_series} series open, "
                f"the PACS holds {count}"
            )
        time.sleep(POLL_S)


def straight(storescu: str, root: Path, files: Sequence[Path]) -> dict[str, Any]:
    """The series sent straight to an Orthanc: the scanner's wait without the appliance."""
    orthanc = pacs(root)
    try:
        sent = send(storescu, orthanc.dicom_port, files, called=PACS_AE)
        held = contents(orthanc)
    finally:
        orthanc.kill()
    shutil.rmtree(root, ignore_errors=True)
    if held["objects"] != len(files):
        raise RuntimeError(f"Orthanc holds {held['objects']} of the {len(files)} slices sent")
    return {"storescu_s": sent.acknowledged - sent.started, "stored_bytes": held["bytes"]}


def through_appliance(
    make_daemon: Callable[..., BenchDaemon],
    root: Path,
    storescu: str,
    warm: Path,
    files: Sequence[Path],
    report_per: str,
    stable_s: float,
) -> dict[str, Any]:
    """The series to the daemon, its PACS a fresh Orthanc: the scanner's wait, when the PACS held the last of the
    series' objects (after the last slice was acknowledged), what it holds."""
    orthanc = pacs(root / "orthanc")
    daemon = make_daemon(root=root / "daemon", dicom=True, pacs_port=orthanc.dicom_port, report_per=report_per,
                         series_stable_s=stable_s)  # fmt: skip
    feed = None
    try:
        daemon.start()
        feed = SeriesFeed(daemon.port)
        daemon.publish(daemon.stage(warm, warm.name))  # a PNG through the folder: workers and model warm, no series
        daemon.wait_for(1, RESULTS_WAIT_S)
        cpu_before = daemon.cpu_seconds()
        sent = send(storescu, daemon.dicom_port, files)
        daemon.wait_for(1 + len(files), RESULTS_WAIT_S)
        last_result = max(a.at for a in daemon.arrivals)
        delivered = wait_delivered(feed, orthanc)
        cpu_s = daemon.cpu_seconds() - cpu_before
        held = contents(orthanc)
    finally:
        if feed is not None:
            feed.close()
        daemon.stop()
        orthanc.kill()
    rejected = sum(1 for a in daemon.arrivals if a.result.rejection.code)
    shutil.rmtree(root, ignore_errors=True)
    arrived, series = delivered.feed[-1]
    return {
        "report_per": report_per,
        "storescu_s": sent.acknowledged - sent.started,
        "rejected": rejected,
        "series_results": len(delivered.feed),
        "last_result_after_last_slice_s": last_result - sent.acknowledged,
        # The series result's own clocks (the daemon's, ms): its last image stored, then the result made.
        "series_made_after_last_slice_s": series.created_unix_ms / 1e3 - sent.acknowledged,
        "series_made_after_last_image_s": (series.created_unix_ms - series.last_image_unix_ms) / 1e3,
        "series_streamed_after_last_slice_s": arrived - sent.acknowledged,
        "delivered_after_last_slice_s": delivered.at - sent.acknowledged,
        "daemon_cpu_s": cpu_s,
        "decision": pb.Decision.Name(series.decision).removeprefix("DECISION_").lower(),
        "images_scored": series.images_scored,
        "key_images": len(series.key_images),
        "pacs": held,
    }


def measure(
    make_daemon: Callable[..., BenchDaemon],
    work: Path,
    warm: Path,
    files: Sequence[Path],
    stable_s: float,
    image_files: Sequence[Path],
) -> dict[str, Any]:
    """The series figures, each against the others in this run: {"series": ...}, or {"series": {"skipped": why}}
    where DCMTK or Orthanc is missing. ``image_files``: the slices (all, or the first n) for the report per image."""
    storescu = find_storescu()
    absent = MISSING if storescu is None else missing("Orthanc")
    if storescu is None or absent:
        print(absent, flush=True)
        return {"series": {"skipped": absent}}
    source = sum(p.stat().st_size for p in files)
    print(f"series: storescu sends {len(files)} slices straight to an Orthanc ...", flush=True)
    direct = straight(storescu, work / "direct", files)
    print(f"series: the same to the daemon, a report per series (stable_s {stable_s:g} s) ...", flush=True)
    per_series = through_appliance(make_daemon, work / "per-series", storescu, warm, files, "series", stable_s)
    print(f"series: {len(image_files)} slices of it to a fresh daemon, a report per image ...", flush=True)
    per_image = through_appliance(make_daemon, work / "per-image", storescu, warm, image_files, "image", stable_s)
    scale = len(files) / len(image_files)  # a report per image: objects and bytes grow with the slices
    latency = per_series["delivered_after_last_slice_s"]
    return {
        "series": {
            "slices": len(files),
            "source_bytes": source,
            "stable_s": stable_s,
            "straight": direct,
            "per_series": per_series,
            "per_image": per_image,
            "per_image_slices": len(image_files),
            "per_image_scale": scale,
            "ratio_storescu_to_straight": per_series["storescu_s"] / direct["storescu_s"],
            "ratio_delivered_to_stable_s": latency / stable_s,
            "delivered_beyond_stable_s": latency - stable_s,
            "ratio_objects_series_to_image": per_series["pacs"]["objects"] / (per_image["pacs"]["objects"] * scale),
            "ratio_bytes_series_to_image": per_series["pacs"]["bytes"] / (per_image["pacs"]["bytes"] * scale),
            "ratio_bytes_series_to_source": per_series["pacs"]["bytes"] / source,
            "ratio_bytes_image_to_source": per_image["pacs"]["bytes"] * scale / source,
        }
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _held(p: dict[str, Any], scale: float = 1.0) -> str:
    parts = ", ".join(
        f"{m} {round(e['objects'] * scale)} ({_mb(e['bytes'] * scale)})" for m, e in p["by_modality"].items()
    )
    return f"{round(p['objects'] * scale)} objects, {_mb(p['bytes'] * scale)}: {parts}"


def text(f: dict[str, Any]) -> str:
    s = f["series"]
    if "skipped" in s:
        return f"workload series: skipped: {s['skipped']}"
    ps, pi, st, n = s["per_series"], s["per_image"], s["stable_s"], s["per_image_slices"]
    per_image = _held(pi["pacs"], s["per_image_scale"])
    if s["per_image_scale"] != 1:
        per_image += f"\n    (measured on {n} slices: {_held(pi['pacs'])}; scaled x{s['per_image_scale']:.2f})"
    lines = [
        f"workload series: one CT series of {s['slices']} slices ({SIZE}x{SIZE}, 16-bit, "
        f"{_mb(s['source_bytes'])}), model {f['model']}, {f['cpus']} CPUs",
        "  DCMTK storescu on this host (one association) -> the daemon's receiver, [pacs] on -> a real Orthanc",
        f"  series.stable_s        {st:g} s",
        f"  series result          {ps['decision']}, {ps['images_scored']} images scored, "
        f"{ps['rejected']} rejected, {ps['key_images']} key images ({ps['series_results']} series result)",
        f"  last slice -> its report in the PACS  {ps['delivered_after_last_slice_s']:.2f} s   ratio to stable_s "
        f"{s['ratio_delivered_to_stable_s']:.3f}   beyond stable_s {s['delivered_beyond_stable_s']:+.2f} s",
        f"    after the last slice: last image result {ps['last_result_after_last_slice_s']:.3f} s, series result "
        f"made {ps['series_made_after_last_slice_s']:.2f} s ({ps['series_made_after_last_image_s']:.2f} s after "
        f"its last image), streamed {ps['series_streamed_after_last_slice_s']:.2f} s, in the PACS "
        f"{ps['delivered_after_last_slice_s']:.2f} s",
        f"  to the PACS per series {_held(ps['pacs'])}",
        f"  to the PACS per image  {per_image}",
        f"    ratio per series / per image   objects {s['ratio_objects_series_to_image']:.4f}   bytes "
        f"{s['ratio_bytes_series_to_image']:.4f}",
        f"    ratio to the series' own bytes   per series {s['ratio_bytes_series_to_source']:.4f}   per image "
        f"{s['ratio_bytes_image_to_source']:.3f}",
        f"    per image, last slice -> last report in the PACS {pi['delivered_after_last_slice_s']:.2f} s ({n} slices)",
        f"  the scanner's wait     storescu to the daemon {ps['storescu_s']:.2f} s, straight to Orthanc "
        f"{s['straight']['storescu_s']:.2f} s   ratio {s['ratio_storescu_to_straight']:.2f}",
        f"                         (with a report per image: {pi['storescu_s']:.2f} s for {n} slices)",
        f"  daemon CPU             per series {ps['daemon_cpu_s']:.1f} s, per image {pi['daemon_cpu_s']:.1f} s "
        f"({n} slices)   ratio {ps['daemon_cpu_s'] / pi['daemon_cpu_s']:.3f}   (first slice sent to the last object "
        "in the PACS)",
    ]
    return "\n".join(lines)
