"""The daemon: wires the ways in, the intake, the journal, the scoring stages and the gRPC server; runs them."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from appliance import __version__
from appliance.api.core_log import capture_core_log
from appliance.api.grpc_server import GrpcServer
from appliance.api.metrics import Metrics
from appliance.api.service import Hooks, ScoringService
from appliance.api.tls import check_exposure
from appliance.api.tokens import TokenStore
from appliance.app.systemd_notify import notify, watchdog_interval_s
from appliance.config import Config
from appliance.delivery.outbox import Outbox
from appliance.delivery.overlay import DISPLAY_SIDE
from appliance.delivery.reports import Reports, device_for
from appliance.domain.errors import ApplianceError, ConfigError
from appliance.domain.faults import Faults
from appliance.domain.manifest import LoadedManifest, load_manifest
from appliance.files import disposal
from appliance.inference.backend import Backend
from appliance.inference.loader import Served, expected_sample_shape, open_served
from appliance.intake.dicom_receiver import DicomReceiver
from appliance.intake.folder import FolderIntake
from appliance.intake.intake import Intake
from appliance.intake.watcher import FolderWatcher
from appliance.journal.integrity import open_journal
from appliance.journal.journal import Journal
from appliance.scoring.stages import ScoringStages
from appliance.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite3"
CHECK_S = 1.0  # how often the run loop checks free space and the stages
# systemd kills the service TimeoutStopSec (60 s) after SIGTERM: a graceful stop gives up well before that.
STOP_LIMIT_S = 40.0
FINISH_IN_FLIGHT_S = 20.0  # of which finishing what is in the stages may take this long
OUTBOX_STOP_S = 5.0  # and the outbox's send in flight this long


PRIVATE_UMASK = 0o077  # every file the daemon and its workers make holds patient data or points to it: 0600/0700


def _check_folders(config: Config) -> None:
    """The watch folder must exist (it is the scanner's); the appliance's own folders are made, and closed to
    other users (0700) whatever an older version or an installer left, since files moved in keep their mode."""
    watch = config.watch.dir
    if not watch.is_dir():
        raise ConfigError(f"The watch folder {watch} does not exist (watch.dir); create it or fix the path.")
    assert config.storage.identity_dir is not None, "Config.resolved sets it"
    for folder in (
        config.watch.processed_dir,
        config.watch.rejected_dir,
        config.storage.data_dir,
        config.storage.data_dir / "spool",
        config.storage.identity_dir,
    ):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"Cannot create {folder}: {e.strerror}.") from e
        try:
            if folder.stat().st_mode & 0o077:
                folder.chmod(0o700)
        except OSError as e:  # another user's folder, a share: said, not fatal
            log.warning("%s is open to other users and cannot be made private (%s): chmod 700 it", folder, e.strerror)


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
        self.stages: ScoringStages | None = None
        self.intake: Intake | None = None
        self.folder: FolderIntake | None = None
        self.watcher: FolderWatcher | None = None
        self.server: GrpcServer | None = None
        self.receiver: DicomReceiver | None = None
        self.outbox: Outbox | None = None
        self.ready = False
        self.generation = 0  # model reloads since the start
        self._reload_lock = threading.Lock()
        # Faults hold the daemon back without stopping it: health NOT_SERVING, Status.problems, intake paused.
        watch = config.watch
        written = [config.storage.data_dir, watch.rejected_dir]
        if watch.after_scoring == "move":
            written.append(watch.processed_dir)
        self.faults = Faults(written, config.storage.min_free_mb)
        self._accepting = True
        self._faults_lock = threading.Lock()  # listeners run in whichever thread saw the change
        self.faults.subscribe(self._faults_changed)

    # --- start --------------------------------------------------------------------------------------

    def start(self) -> int:
        """Bring every stage up; returns the gRPC port. Raises ApplianceError with one clear sentence."""
        config = self.config
        os.umask(PRIVATE_UMASK)
        _check_folders(config)
        assert config.server.tokens_file is not None, "Config.resolved sets it"
        check_exposure(config.server, TokenStore(config.server.tokens_file))  # before the slow model load
        if config.server.tls_cert is not None:
            capture_core_log()  # grpc core tells a refused TLS handshake only on fd 2
        # Refuses (exit 2, one sentence naming `appliance journal recover`) a missing, damaged or foreign journal.
        self.journal = open_journal(config.storage.data_dir / JOURNAL_NAME, config.storage.identity_dir)
        self.journal.on_damage(lambda sentence: self.faults.set("journal", sentence, blocks_intake=True))
        self.loaded = load_manifest(config.model.dir)
        # Loading also runs one warm-up inference, so the first real image is not the slow one.
        self.served = open_served(self.loaded, config.inference, config.model.engines_dir)
        self.backend = self.served.backend
        self.metrics.serving.labels(self.backend.name, self.served.precision).set(1)
        self.metrics.passed_over.set(self.served.refused)
        # With a PACS, each scored DICOM image's report is stored with its result and sent by the outbox.
        reports = (
            Reports(config.pacs, device_for(config.pacs, self.journal.identity())) if config.pacs.enabled else None
        )
        # Beside each report, a heatmap overlay where the served model gives heatmaps (the manifest declares one,
        # inference.heatmaps is on) and pacs.overlays is on: drawn on the frames as shown, which the preparer keeps.
        overlays = reports is not None and config.pacs.overlays and self.backend.has_heatmap
        self.stages = ScoringStages(
            config,
            self.loaded.manifest,
            self.backend,
            self.journal,
            self.metrics,
            faults=self.faults,
            reports=reports,
            display_side=DISPLAY_SIDE if overlays else 0,
        )
        self.intake = Intake(
            self.journal, self.stages, config.watch, on_duplicate=self.metrics.duplicates.inc, faults=self.faults
        )
        hooks = Hooks(
            model_info=self.model_info, status=self.status, problem=self.intake_problem, reload=self.reload_model
        )
        spool = config.storage.data_dir / "spool"
        service = ScoringService(self.journal, self.intake, spool, hooks, self.metrics, config.server)
        self.server = GrpcServer(service, config.server)
        # Read before the server and the watcher start: only what the last run left, never a new input.
        pending = self.journal.pending()
        self._clean_spool({row.path for row in pending if disposal.spooled(row.source)})
        self.stages.start()
        if config.pacs.enabled:
            self.outbox = Outbox(self.journal, config.pacs, self.metrics)
            self.outbox.start()
        self.server.start()
        self.metrics.serve(config.server.metrics_host, config.server.metrics_port)
        # In the background: a long backlog must not hold up readiness (submit blocks when stages are full).
        threading.Thread(target=self.intake.requeue, args=(pending, self.stopping), name="requeue", daemon=True).start()
        self.folder = FolderIntake(self.journal, self.stages, self.intake, faults=self.faults)
        self.folder.start()
        exclude = [config.watch.processed_dir, config.watch.rejected_dir, config.storage.data_dir]
        self.watcher = FolderWatcher(config.watch, self.folder.offer, exclude, faults=self.faults)
        self.folder.reconsider = self.watcher.consider
        self.watcher.start()
        if config.dicom.enabled:
            self.receiver = DicomReceiver(
                config.dicom,
                self.intake,
                spool,
                self.faults,
                config.storage.min_free_mb,
                observer=self.metrics,
                max_file_mb=config.limits.max_file_mb,
            )
            self.receiver.start()
        self.ready = True
        self.faults.check_storage()
        self._update_health()
        self.metrics.ready.set(1)
        log.info(
            "ready: watching %s%s, gRPC on %s:%d (%s, %s)%s%s, model %s %s on %s",
            config.watch.dir,
            " (polling)" if config.watch.polling else "",
            config.server.host,
            self.server.port,
            "TLS" if self.server.tls else "plaintext",
            "terminal tokens required" if config.server.tokens_required else "no tokens",
            f", DICOM {config.dicom.ae_title} on {config.dicom.host}:{self.receiver.port}" if self.receiver else "",
            f", reports to {config.pacs.ae_title} at {config.pacs.host}:{config.pacs.port}" if self.outbox else "",
            self.loaded.manifest.model.name,
            self.loaded.manifest.model.version,
            self.backend.name,
        )
        return self.server.port

    def _clean_spool(self, keep: set[str | None]) -> None:
        """Copies spooled (Score, DICOM) but never journaled (a crash in between) were never acknowledged:
        the sender sends again, so drop them."""
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
        pending, oldest_ms = self.journal.outbox_depth()
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
            problems=self.faults.problems(),
            model_generation=self.generation,
            outbox_pending=pending,
            outbox_oldest_age_s=max(0.0, time.time() - oldest_ms / 1e3) if oldest_ms else 0.0,
        )

    def intake_problem(self) -> str | None:
        """Why new inputs are not taken now, in one sentence; None when they are."""
        return self.faults.refusal()

    def reload_model(self) -> pb.ReloadModelResponse:
        """Load the configured model again beside the one serving (self-checked and warmed up by the
        loader), then swap it in between batches. A model that fails is refused; the old one serves on."""
        if not self._reload_lock.acquire(blocking=False):
            return pb.ReloadModelResponse(reloaded=False, message="A reload is under way already.")
        try:
            message = self._reload()
            log.info("%s", message)
            return pb.ReloadModelResponse(reloaded=True, message=message, model=self.model_info())
        except ApplianceError as e:
            message = f"The new model was refused and the one loaded before serves on: {e.message}"
            log.error("%s", message)
            return pb.ReloadModelResponse(reloaded=False, message=message, model=self.model_info())
        finally:
            self._reload_lock.release()

    def _reload(self) -> str:
        assert self.loaded is not None and self.served is not None and self.stages is not None
        config = self.config
        log.info("reloading the model from %s", config.model.dir)
        loaded = load_manifest(config.model.dir)
        old = self.loaded.manifest
        new = loaded.manifest
        if (new.input, new.preprocess) != (old.input, old.preprocess):
            # The decode workers prepare images for the model they were started with.
            raise ConfigError(
                "its input or preprocessing differs from the serving model's; restart the service to switch to it."
            )
        served = open_served(loaded, config.inference, config.model.engines_dir)
        had_heatmaps = self.served.backend.has_heatmap
        if not self.stages.swap_model(new, served.backend):
            served.backend.close()
            raise ConfigError("the scoring stage did not take the new model within its time limit.")
        previous = self.served
        self.metrics.serving.labels(previous.backend.name, previous.precision).set(0)
        self.loaded, self.served, self.backend = loaded, served, served.backend
        self.generation += 1
        self.metrics.serving.labels(served.backend.name, served.precision).set(1)
        self.metrics.passed_over.set(served.refused)
        if config.pacs.enabled and config.pacs.overlays and served.backend.has_heatmap != had_heatmaps:
            # The decode workers keep the frames overlays are drawn on only if they were started for them.
            log.warning(
                "the reloaded model %s heatmaps: the PACS gets heatmap overlays %s after a restart",
                "gives" if served.backend.has_heatmap else "gives no",
                "too" if served.backend.has_heatmap else "no longer",
            )
        return (
            f"reloaded: model {new.model.name} {new.model.version} on {served.backend.name} {served.precision} "
            f"(generation {self.generation}; was {old.model.name} {old.model.version})"
        )

    def stages_alive(self) -> bool:
        """False once a stage's thread has died: the daemon then exits so systemd restarts it."""
        parts = (self.stages, self.folder, self.watcher)
        optional = (self.receiver, self.outbox)  # only where configured
        return all(p is not None and p.alive() for p in parts) and all(p.alive() for p in optional if p is not None)

    def healthy(self) -> bool:
        """What grpc.health says: SERVING only while ready, every stage alive and no fault holds. A fault
        (a full disk, a missing watch folder) keeps the daemon running, NOT_SERVING, until it is over."""
        return self.ready and self.stages_alive() and not self.faults.problems()

    def _update_health(self) -> None:
        if self.server is not None:
            self.server.set_serving(self.healthy())

    def _faults_changed(self) -> None:
        """A fault began or ended (called in the thread that noticed it; one at a time, and reconciled by
        the run loop's checks, so two changes at once cannot leave health saying the older one)."""
        with self._faults_lock:
            self._reconcile_faults()

    def _reconcile_faults(self) -> None:
        for kind in self.faults.kinds(seen=True):
            self.metrics.faults.labels(kind).set(1 if self.faults.holds(kind) else 0)
        self._update_health()
        accepting = self.faults.accepting()
        if accepting and not self._accepting:
            # What waited in the folder meanwhile is taken now: the files offered during the fault, and a
            # rescan for the rest (files whose move aside failed for want of space).
            if self.folder is not None:
                self.folder.retake()
            if self.watcher is not None:
                self.watcher.request_rescan()
        self._accepting = accepting

    def _check(self) -> None:
        """The run loop's periodic checks."""
        try:
            self.faults.check_storage()
        except Exception as e:  # the check must never end the run loop
            log.warning("checking free space failed: %s", type(e).__name__)
        if self.folder is not None:
            self.metrics.held_back.set(self.folder.held_back())
        if self.ready:
            self._faults_changed()

    # --- run and stop -------------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, pinging systemd's watchdog only while every stage is alive."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.stopping.set()

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            # `systemctl reload`: off the signal handler, which must not block.
            threading.Thread(target=self.reload_model, name="reload", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        notify("READY=1\nSTATUS=serving")
        interval = watchdog_interval_s()
        # A fault (disk full, watch folder missing) only makes health NOT_SERVING: the process is fine and
        # keeps pinging the watchdog; a dead stage is what stops it.
        while not self.stopping.wait(min(interval or CHECK_S, CHECK_S)):
            if not self.stages_alive():
                log.error("a pipeline stage has died; stopping so systemd restarts the service")
                break
            self._check()
            if interval:
                notify("WATCHDOG=1")
        self.stop()

    def stop(self) -> None:
        """Graceful: stop taking files, finish what is in flight, close. Unfinished inputs stay queued.

        Bounded: after STOP_LIMIT_S (well inside systemd's TimeoutStopSec) a stage that is stuck is abandoned
        and the process exits; what was in flight stays queued in the journal and is requeued at the next start.
        """
        notify("STOPPING=1")
        self.ready = False
        self.stopping.set()
        self.metrics.ready.set(0)
        deadline = time.monotonic() + STOP_LIMIT_S
        step = ["stopping the server's health"]
        stopper = threading.Thread(target=self._stop_stages, args=(deadline, step), name="stop", daemon=True)
        stopper.start()
        stopper.join(STOP_LIMIT_S)
        if stopper.is_alive():
            left = self.stages.in_flight() if self.stages is not None else 0
            log.error(
                "stopping took longer than %.0f s (stuck %s); exiting now: the %d inputs in flight stay queued "
                "in the journal and are scored at the next start",
                STOP_LIMIT_S,
                step[0],
                left,
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)  # the stuck thread can't be stopped; the journal is crash-safe by design
        log.info("stopped")

    def _stop_stages(self, deadline: float, step: list[str]) -> None:
        """Each stage in turn, noting in ``step`` which one it is in (for the log, should it hang)."""
        if self.server is not None:
            self.server.set_serving(False)
        step[0] = "stopping the watcher"
        if self.watcher is not None:
            self.watcher.stop()
        step[0] = "stopping the DICOM receiver"
        if self.receiver is not None:
            self.receiver.stop()
        step[0] = "stopping the outbox"
        if self.outbox is not None:
            # First, and briefly: what it has not sent stays in the journal's outbox for the next start, and a
            # PACS that does not answer must not hold the stop past systemd's limit.
            self.outbox.stop(timeout=OUTBOX_STOP_S)
        step[0] = "stopping the ingest"
        if self.folder is not None:
            self.folder.stop()
        step[0] = "stopping the gRPC server"
        if self.server is not None:
            # Before the stages: Score calls in flight get their answers, and no new one comes in.
            self.server.stop(grace=5.0)
        step[0] = "finishing the inputs in flight"
        if self.stages is not None:
            # Leave time for the rest of the stop (pool, batcher, journal) inside the limit.
            self.stages.stop(timeout=max(1.0, min(FINISH_IN_FLIGHT_S, deadline - time.monotonic() - 15.0)))
        step[0] = "closing the backend"
        if self.backend is not None:
            self.backend.close()
        step[0] = "closing the journal"
        if self.journal is not None:
            self.journal.close()
