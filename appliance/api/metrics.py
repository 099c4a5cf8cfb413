"""Prometheus metrics: what IT staff graph and alert on."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from appliance.config import is_loopback
from appliance.domain.errors import ApplianceError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


ENGINE_BUILD_STATES = ("building", "swapped", "gate_failed", "failed")


class Metrics:
    """One registry per daemon, so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.results = Counter(
            "appliance_results",
            "Results stored, by outcome and reason code.",
            ["outcome", "code"],
            registry=r,
        )
        self.duplicates = Counter("appliance_duplicates", "Inputs whose content was already scored.", registry=r)
        self.latency = Histogram(
            "appliance_result_latency_seconds",
            "From the input being picked up to its result being stored.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "appliance_stage_seconds", "Time per stage.", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "appliance_batch_size",
            "Samples per inference batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.in_flight = Gauge("appliance_inputs_in_flight", "Inputs being decoded, scored or stored.", registry=r)
        self.ready = Gauge("appliance_ready", "1 when the daemon serves, 0 while starting or stopping.", registry=r)
        self.streams = Gauge("appliance_result_streams", "Open StreamResults calls.", registry=r)
        self.serving = Gauge(
            "appliance_serving_artifact",
            "1 for the artifact served, by backend and precision (alert on fp32 where int8 was built).",
            ["backend", "precision"],
            registry=r,
        )
        self.faults = Gauge(
            "appliance_faults",
            "1 while a fault holds (health NOT_SERVING), by kind: storage (disk full), watch_dir (folder missing).",
            ["kind"],
            registry=r,
        )
        self.held_back = Gauge(
            "appliance_files_held_back",
            "Files left in the watch folder while a fault stops intake; taken once it is over.",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "appliance_outbox_pending", "DICOM reports waiting in the outbox for the PACS.", registry=r
        )
        self.outbox_age = Gauge(
            "appliance_outbox_oldest_age_seconds",
            "How long the oldest report in the outbox has waited (0 when none): alert when the PACS is away.",
            registry=r,
        )
        self.outbox_delivered = Counter("appliance_outbox_delivered", "DICOM reports the PACS stored.", registry=r)
        self.outbox_refused = Counter(
            "appliance_outbox_refused",
            "DICOM reports the PACS refused for good, by DIMSE status (hex): set aside, never retried.",
            ["status"],
            registry=r,
        )
        self.dicom_refusals = Counter(
            "appliance_dicom_refusals",
            "DICOM connections refused and associations aborted by the receiver, by reason (host_limit, "
            "pending_full, request_timeout, request_too_large, calling_ae, ae_limit, association_limit, "
            "pdu_too_large, network_timeout, ...): alert on a rise.",
            ["reason"],
            registry=r,
        )
        self.insecure = Gauge(
            "appliance_insecure",
            "1 while server.insecure = true serves the network in plaintext without terminal tokens (a lab only).",
            registry=r,
        )
        self.open_series = Gauge(
            "appliance_series_open",
            "DICOM series assembling now: images arriving, their series result not yet made (read when scraped).",
            registry=r,
        )
        self.series_results = Counter(
            "appliance_series_results",
            "Series results stored, by decision (positive, negative, indeterminate); revisions included.",
            ["decision"],
            registry=r,
        )
        self.series_revisions = Counter(
            "appliance_series_revisions",
            "Series results that revise an earlier one: a late image re-opened its series.",
            registry=r,
        )
        self.passed_over = Gauge(
            "appliance_artifacts_passed_over",
            "Built artifacts the daemon did not serve at load: another host's key, damaged, or a failed self-check.",
            registry=r,
        )
        self.engine_build = Gauge(
            "appliance_engine_build",
            "inference.build_on_start: 1 for the background build's state (building, swapped, gate_failed, "
            "failed), 0 for the others; all 0 where no build was needed.",
            ["state"],
            registry=r,
        )

    def on_engine_build(self, state: str) -> None:
        for known in ENGINE_BUILD_STATES:
            self.engine_build.labels(known).set(1 if known == state else 0)

    # --- what the scoring stages report (appliance.scoring.observer.ScoringObserver) ------------------

    def on_in_flight(self, count: int) -> None:
        self.in_flight.set(count)

    def on_batch(self, size: int, infer_ms: float) -> None:
        self.batch_size.observe(size)
        self.stage.labels("infer").observe(infer_ms / 1e3)

    def on_result(self, outcome: str, code: str) -> None:
        self.results.labels(outcome, code).inc()

    def on_finished(self, seconds: float, decode_ms: float | None, preprocess_ms: float | None) -> None:
        self.latency.observe(seconds)
        if decode_ms is not None:
            self.stage.labels("decode").observe(decode_ms / 1e3)
        if preprocess_ms is not None:
            self.stage.labels("preprocess").observe(preprocess_ms / 1e3)

    # --- what the series assembly reports (appliance.scoring.series.SeriesObserver) ----------------------

    def on_series(self, decision: str, revision: int) -> None:
        """A series result stored: ``decision`` as Decision.value, ``revision`` 1 for a series' first. The open
        series gauge reads the journal when scraped instead (a series opens with its first image, not here)."""
        self.series_results.labels(decision).inc()
        if revision > 1:
            self.series_revisions.inc()

    def count_open_series(self, count: Callable[[], int]) -> None:
        """The open series gauge reads ``count`` (the journal's) when scraped; the last value read while the
        journal cannot answer (its problem is on health)."""
        last = 0

        def read() -> float:
            nonlocal last
            with contextlib.suppress(sqlite3.Error, ApplianceError):
                last = count()
            return last

        self.open_series.set_function(read)

    # --- what the outbox reports (appliance.delivery.outbox.OutboxObserver) --------------------------

    def on_delivered(self, count: int) -> None:
        self.outbox_delivered.inc(count)

    def on_refused(self, status: int) -> None:
        self.outbox_refused.labels(f"0x{status:04X}").inc()

    def on_depth(self, pending: int, oldest_age_s: float) -> None:
        self.outbox_pending.set(pending)
        self.outbox_age.set(oldest_age_s)

    # --- what the DICOM receiver reports (appliance.intake.dicom_admission.RefusalObserver) --------------

    def on_dicom_refusal(self, reason: str) -> None:
        self.dicom_refusals.labels(reason).inc()

    def serve(self, host: str, port: int) -> None:
        if not port:
            return
        if not is_loopback(host):
            # No patient data here, but the counts, the model served and the faults are the clinic's business.
            log.warning(
                "metrics on %s:%d answer anyone who can reach the port, without TLS or a token "
                "(server.metrics_host): let the firewall admit only the scraper, or listen on 127.0.0.1",
                host,
                port,
            )
        start_http_server(port, addr=host, registry=self.registry)
