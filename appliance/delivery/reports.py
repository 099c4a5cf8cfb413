"""Which results go to the PACS, and their DICOM objects made ready for the outbox: the report (SR) of each
scored DICOM image, and beside it the heatmap overlay (Secondary Capture) where the result has a heatmap and the
preparer kept the frame as shown. They are made on the finisher's thread before the results are stored, so each
object is queued in the same transaction as its result: a result stored is its objects queued, even across a
crash. The report comes first: the result's delivery (GetResult) is its report's.

Where `pacs.report_per` is "series" (the default) an image's result sends nothing: its series, once complete,
sends one SR, one Key Object Selection and its key images' heatmaps instead (series_report.py), made of what each
candidate key image kept of itself (key_material) while its source was still there."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from appliance import __version__
from appliance.config import PacsConfig
from appliance.delivery.overlay import build_overlay
from appliance.delivery.series_report import KeyMaterial, SeriesReports
from appliance.delivery.sr import Device, ReportError, build_report, encode
from appliance.domain.manifest import Manifest
from appliance.domain.result import Outcome, Result
from appliance.domain.series import SeriesResult
from appliance.journal.journal import NewDelivery

log = logging.getLogger(__name__)

MODEL_NAME = "imaging-appliance"


def device_for(pacs: PacsConfig, journal_id: str) -> Device:
    """This appliance as its reports' observer: one UID per box (its journal's identity), never a patient's."""
    return Device(
        uid=generate_uid(entropy_srcs=[MODEL_NAME, journal_id]),
        name=pacs.calling_ae_title,
        manufacturer=pacs.manufacturer,
        model_name=MODEL_NAME,
        software_version=__version__,
    )


class Reports:
    def __init__(self, pacs: PacsConfig, device: Device) -> None:
        self.pacs = pacs
        self.device = device
        self.series = SeriesReports(pacs, device)

    def for_input(
        self,
        input_id: int,
        path: Path,
        results: list[Result],
        manifest: Manifest,
        display: Sequence[np.ndarray] = (),
    ) -> list[tuple[NewDelivery, ...]]:
        """Per result, its report when it scored a DICOM image, then its overlay where it has a heatmap and
        ``display`` (the input's frames as shown, Prepared.display) holds its frame; nothing for the rest. A source
        whose header cannot be read again gets neither (its result is stored and streamed all the same), and says
        why; an overlay that cannot be made leaves its report to go alone. Nothing where reports go per series."""
        if self.pacs.report_per == "series":
            return [() for _ in results]
        wanted = [r.outcome is Outcome.SCORED and bool(r.ids.sop_instance_uid) for r in results]
        if not any(wanted):
            return [() for _ in results]
        try:
            source = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:
            log.warning(
                "input %d: no report for the PACS: its header could not be read again (%s)",
                input_id,
                type(e).__name__,
            )
            return [() for _ in results]
        out: list[tuple[NewDelivery, ...]] = []
        for result, want in zip(results, wanted, strict=True):
            if not want:
                out.append(())
                continue
            try:
                report = build_report(source, result, manifest, self.device, series_number=self.pacs.series_number)
                sent = NewDelivery(str(report.SOPClassUID), str(report.SOPInstanceUID), encode(report))
                out.append((sent, *self._overlay(input_id, source, result, manifest, display, sent)))
            except ReportError as e:
                log.warning("input %d frame %d: no report for the PACS: %s", input_id, result.frame_index, e.message)
                out.append(())
            except Exception as e:  # a result is never held back by its report; the type only (no header data)
                log.error(
                    "input %d frame %d: no report for the PACS: %s while making it",
                    input_id,
                    result.frame_index,
                    type(e).__name__,
                )
                out.append(())
        return out

    def _overlay(
        self,
        input_id: int,
        source: pydicom.Dataset,
        result: Result,
        manifest: Manifest,
        display: Sequence[np.ndarray],
        report: NewDelivery,
    ) -> tuple[NewDelivery, ...]:
        if result.heatmap is None or result.frame_index >= len(display):
            return ()
        try:
            overlay = build_overlay(
                source,
                result,
                display[result.frame_index],
                manifest,
                self.device,
                # The overlays' series follows the reports' (9001, 9002 by default).
                series_number=self.pacs.series_number + 1,
                report=(report.sop_class_uid, report.sop_instance_uid),
            )
            return (NewDelivery(str(overlay.SOPClassUID), str(overlay.SOPInstanceUID), encode(overlay)),)
        except ReportError as e:
            log.warning("input %d frame %d: no overlay for the PACS: %s", input_id, result.frame_index, e.message)
        except Exception as e:  # the report goes without it; the type only (no header data)
            log.error(
                "input %d frame %d: no overlay for the PACS: %s while making it",
                input_id,
                result.frame_index,
                type(e).__name__,
            )
        return ()

    def key_material(
        self, input_id: int, path: Path, result: Result, display: np.ndarray | None
    ) -> tuple[bytes, bytes | None] | None:
        """What a scored DICOM image that may become a key image of its series keeps for its objects: its header
        without pixels, and ``display`` (its frame as shown) where it has a heatmap and overlays are on
        (SeriesReports.key_material). None where the header cannot be read again, and with per-image reports (the
        series then send nothing to the PACS)."""
        if self.pacs.report_per != "series":
            return None
        return self.series.key_material(input_id, path, result, display)

    def for_series(
        self, result: SeriesResult, keys: Sequence[KeyMaterial], manifest: Manifest
    ) -> tuple[NewDelivery, ...]:
        """A complete series' SR, KOS and key images' heatmaps, in that order (SeriesReports.for_series)."""
        return self.series.for_series(result, keys, manifest)
