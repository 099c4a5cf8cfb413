"""The daemon: wires watcher → ingest → journal → processor → gRPC, and runs it until a signal."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from appliance import __version__
from appliance.config import Config
from appliance.errors import ConfigError, RepeatedCrash
from appliance.inference.backend import Backend
from appliance.inference.loader import Served, expected_sample_shape, open_served
from appliance.ingest.ingestor import Ingestor
from appliance.ingest.journal import InputRow, Journal
from appliance.ingest.watcher import FolderWatcher
from appliance.manifest import LoadedManifest, load_manifest
from appliance.processing import Job, Processor
from appliance.results import InputFacts
from appliance.server.grpc_server import GrpcServer
from appliance.server.metrics import Metrics
from appliance.server.service import ScoringService
from appliance.systemd_notify import notify, watchdog_interval_s
from appliance.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite3"
MAX_ATTEMPTS = 3  # starts that may find the same input unfinished before it is set aside


def _check_folders(config: Config) -> None:
    watch = config.watch.dir
    if not watch.is_dir():
        raise ConfigError(f"The watch folder {watch} does not exist (watch.dir); create it or fix the path.")
    for folder in (config.watch.processed_dir, config.watch.rejected_dir, config.storage.data_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"Cannot create {folder}: {e.strerror}.") from e


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.monotonic()
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.loaded: LoadedManifest | None = None
        self.backend: Backend | None = None
        self.served: Served | None = None
        self.journal: Journal | None = None
        self.processor: Processor | None = None
        self.ingestor: Ingestor | None = None
        self.watcher: FolderWatcher | None = None
        self.server: GrpcServer | None = None
        self.ready = False

    # --- start --------------------------------------------------------------------------------------

    def start(self) -> int:
        """Bring every stage up; returns the gRPC port. Raises ApplianceError with one clear sentence."""
        config = self.config
        _check_folders(config)
        self.loaded = load_manifest(config.model.dir)
        # Loading also runs one warm-up inference, so the first real image is not the slow one.
        self.served = open_served(self.loaded, config.inference, config.model.engines_dir)
        self.backend = self.served.backend
        self.metrics.serving.labels(self.backend.name, self.served.precision).set(1)
        self.metrics.passed_over.set(self.served.refused)
        self.journal = Journal(config.storage.data_dir / JOURNAL_NAME)
        self.processor = Processor(config, self.loaded.manifest, self.backend, self.journal, self.metrics)
        service = ScoringService(
            self.journal,
            self.processor,
            config.storage.data_dir / "spool",
            self.model_info(),
            self.status,
            self.metrics,
        )
        self.server = GrpcServer(service, config.server.host, config.server.port, config.server.max_message_mb)
        # Read before the server and the watcher start: only what the last run left, never a new input.
        pending = self.journal.pending()
        self._clean_spool({row.path for row in pending if row.source == "grpc"})
        self.processor.start()
        self.server.start()
        self.metrics.serve(config.server.host, config.server.metrics_port)
        # In the background: a long backlog must not hold up readiness (submit blocks when stages are full).
        threading.Thread(target=self._requeue, args=(pending,), name="requeue", daemon=True).start()
        self.ingestor = Ingestor(config.watch, self.journal, self.processor)
        self.ingestor.start()
        exclude = [config.watch.processed_dir, config.watch.rejected_dir, config.storage.data_dir]
        self.watcher = FolderWatcher(config.watch, self.ingestor.offer, exclude)
        self.ingestor.reconsider = self.watcher.consider
        self.watcher.start()
        self.ready = True
        self.server.set_serving(True)
        self.metrics.ready.set(1)
        log.info(
            "ready: watching %s%s, gRPC on %s:%d, model %s %s on %s",
            config.watch.dir,
            " (polling)" if config.watch.polling else "",
            config.server.host,
            self.server.port,
            self.loaded.manifest.model.name,
            self.loaded.manifest.model.version,
            self.backend.name,
        )
        return self.server.port

    def _requeue(self, pending: list[InputRow]) -> None:
        """Inputs journaled but never finished (a crash, a power cut) are scored now, once."""
        assert self.processor is not None
        if not pending:
            return
        log.info("requeueing %d inputs left in flight by the last run", len(pending))
        attempts = self.journal.count_attempt([row.id for row in pending]) if self.journal else {}
        for row in pending:
            facts = InputFacts(
                input_id=row.id, source=row.source, file_name=row.file_name, content_hash=row.content_hash
            )
            assert row.path, "every input is journaled with its path"
            # A file that vanished meanwhile is rejected by the processor (file_vanished), like any read failure.
            if self.stopping.is_set():
                return
            job = Job(facts=facts, path=Path(row.path))
            if attempts.get(row.id, 0) > MAX_ATTEMPTS:
                # It was in flight at each of the last starts: likely what killed the process (OOM, a crash
                # in a native decoder). Set it aside instead of crash-looping on it.
                log.error("input %d was unfinished at %d starts in a row; rejecting it", row.id, attempts[row.id])
                self.processor.submit_rejected(job, RepeatedCrash())
            else:
                self.processor.submit(job)

    def _clean_spool(self, keep: set[str | None]) -> None:
        """Score requests spooled but never journaled (a crash in between) were never answered: drop them."""
        for path in (self.config.storage.data_dir / "spool").glob("*"):
            if str(path) not in keep:
                path.unlink(missing_ok=True)

    # --- what the API reports -----------------------------------------------------------------------

    def model_info(self) -> pb.ModelInfo:
        assert self.loaded is not None and self.backend is not None
        m = self.loaded.manifest
        return pb.ModelInfo(
            name=m.model.name,
            version=m.model.version,
            description=m.model.description,
            backend=self.backend.name,
            artifact=self.backend.artifact,
            labels=m.output.labels,
            input_layout=m.input.layout,
            input_shape=list(expected_sample_shape(self.loaded)),
            max_batch=self.backend.max_batch,
            decision_rule=m.decision.rule,
            threshold=m.decision.threshold,
            precision=self.served.precision if self.served else "",
            served_because=self.served.reason if self.served else "",
            passed_over=self.served.passed_over if self.served else [],
        )

    def status(self) -> pb.Status:
        assert self.journal is not None
        counts = self.journal.counts()
        return pb.Status(
            version=__version__,
            model=self.model_info(),
            backend=self.backend.name if self.backend else "",
            queue_depth=counts.queued,
            scored=counts.scored,
            rejected=counts.rejected,
            duplicates=counts.duplicates,
            last_sequence=counts.last_sequence,
            uptime_s=time.monotonic() - self.started_at,
            watch_dir=str(self.config.watch.dir),
            ready=self.ready,
        )

    def healthy(self) -> bool:
        parts = (self.processor, self.ingestor, self.watcher)
        return self.ready and all(p is not None and p.alive() for p in parts)

    # --- run and stop -------------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, pinging systemd's watchdog only while every stage is alive."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        notify("READY=1\nSTATUS=serving")
        interval = watchdog_interval_s()
        while not self.stopping.wait(interval or 1.0):
            if interval and self.healthy():
                notify("WATCHDOG=1")
            elif not self.healthy():
                log.error("a pipeline stage has died; stopping so systemd restarts the service")
                break
        self.stop()

    def stop(self) -> None:
        """Graceful: stop taking files, finish what is in flight, close. Unfinished inputs stay queued."""
        notify("STOPPING=1")
        self.ready = False
        self.metrics.ready.set(0)
        if self.server is not None:
            self.server.set_serving(False)
        if self.watcher is not None:
            self.watcher.stop()
        if self.ingestor is not None:
            self.ingestor.stop()
        if self.server is not None:
            # Before the processor: Score calls in flight get their answers, and no new one comes in.
            self.server.stop(grace=5.0)
        if self.processor is not None:
            self.processor.stop()
        if self.backend is not None:
            self.backend.close()
        if self.journal is not None:
            self.journal.close()
        log.info("stopped")
