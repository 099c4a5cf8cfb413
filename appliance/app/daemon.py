"""The daemon: builds the ways in, the intake, the journal, the served model, the scoring stages and the gRPC
server from the config, starts them, serves until a signal, and stops them in order."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from appliance.api import codec
from appliance.api.core_log import capture_core_log
from appliance.api.grpc_server import GrpcServer
from appliance.api.health import Health
from appliance.api.metrics import Metrics
from appliance.api.service import Hooks, ScoringService
from appliance.api.tls import check_exposure
from appliance.api.tokens import TokenStore
from appliance.app.engine_build import EngineBuild
from appliance.app.shutdown import Shutdown
from appliance.app.systemd_notify import notify, watchdog_interval_s
from appliance.config import Config
from appliance.delivery.outbox import Outbox
from appliance.delivery.overlay import DISPLAY_SIDE
from appliance.delivery.reports import Reports, device_for
from appliance.domain.errors import ConfigError
from appliance.domain.faults import Faults
from appliance.files import disposal, spool
from appliance.inference.loader import Served
from appliance.intake.dicom_receiver import DicomReceiver
from appliance.intake.folder import FolderIntake
from appliance.intake.intake import Intake
from appliance.intake.watcher import FolderWatcher
from appliance.journal.integrity import open_journal
from appliance.scoring.series import SeriesAssembler
from appliance.scoring.served import Reload, ServedModel
from appliance.scoring.stages import ScoringStages

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite3"
CHECK_S = 1.0  # how often the run loop checks free space and the stages
# systemd kills the service TimeoutStopSec (60 s) after SIGTERM: a graceful stop gives up well before that.
STOP_LIMIT_S = 40.0
FINISH_IN_FLIGHT_S = 20.0  # of which finishing what is in the stages may take this long
OUTBOX_STOP_S = 5.0  # and the outbox's send in flight this long

FINISHING = "finishing the inputs in flight"
# The order the parts stop in, each step named for the log should it hang.
STOP_ORDER = (
    "stopping the server's health",
    "stopping the background build",
    "stopping the watcher",
    "stopping the DICOM receiver",
    # First of the senders, and briefly: what it has not sent stays in the journal's outbox for the next start,
    # and a PACS that does not answer must not hold the stop past systemd's limit.
    "stopping the outbox",
    "stopping the folder's intake",
    # Before the stages: Score calls in flight get their answers, and no new one comes in.
    "stopping the gRPC server",
    FINISHING,
    # After the stages: the series of their last results are complete in the journal, and made at the next start.
    "stopping the series assembly",
    "closing the backend",
    "closing the journal",
)


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


@dataclass(frozen=True)
class Running:
    """What the run loop needs of the parts a start built: the model a SIGHUP reloads into the stages, and the
    folder's way in, whose files held back by a fault it counts."""

    model: ServedModel
    stages: ScoringStages
    folder: FolderIntake

    def reload(self) -> Reload:
        return self.model.reload(self.stages)


class Daemon:
    """The appliance as one process: ``start`` builds and starts its parts, ``run_forever`` serves until a
    signal, ``stop`` stops them in order within a bound."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.monotonic()
        self.stopping = threading.Event()
        self.metrics = Metrics()
        # Faults hold the daemon back without stopping it: health NOT_SERVING, Status.problems, intake paused.
        watch = config.watch
        written = [config.storage.data_dir, watch.rejected_dir]
        if watch.after_scoring == "move":
            written.append(watch.processed_dir)
        self.faults = Faults(written, config.storage.min_free_mb)
        self.health = Health(self.metrics, self.faults)
        self.shutdown = Shutdown(STOP_ORDER)
        self._in_flight = lambda: 0  # how many inputs a stuck stop leaves queued: the stages', once built

    def start(self) -> Running:
        """Build and start every part, each stop step added as its part comes up. Raises ApplianceError with one
        clear sentence."""
        config = self.config
        os.umask(PRIVATE_UMASK)
        _check_folders(config)
        assert config.server.tokens_file is not None, "Config.resolved sets it"
        check_exposure(config.server, TokenStore(config.server.tokens_file))  # before the slow model load
        if config.server.tls_cert is not None:
            capture_core_log()  # grpc core tells a refused TLS handshake only on fd 2
        # Refuses (exit 2, one sentence naming `appliance journal recover`) a missing, damaged or foreign journal.
        journal = open_journal(config.storage.data_dir / JOURNAL_NAME, config.storage.identity_dir)
        self.shutdown.add("closing the journal", journal.close)
        journal.on_damage(lambda sentence: self.faults.set("journal", sentence, blocks_intake=True))
        model = ServedModel(config, on_serving=self._serving, faults=self.faults)
        self.shutdown.add("closing the backend", model.close)
        # With a PACS, each scored DICOM image's report is stored with its result and sent by the outbox.
        reports = Reports(config.pacs, device_for(config.pacs, journal.identity())) if config.pacs.enabled else None
        # Beside each report, a heatmap overlay where the served model gives heatmaps (the manifest declares one,
        # inference.heatmaps is on) and pacs.overlays is on: drawn on the frames as shown, which the preparer keeps.
        overlays = reports is not None and config.pacs.overlays and model.current.backend.has_heatmap
        stages = ScoringStages(
            config,
            model.current.manifest,
            model.current.backend,
            journal,
            self.metrics,
            faults=self.faults,
            reports=reports,
            display_side=DISPLAY_SIDE if overlays else 0,
        )
        self._finish_on_stop(stages)
        build = EngineBuild(
            config, lambda: model.reload(stages), lambda state: self.metrics.on_engine_build(state.value)
        )
        self.shutdown.add("stopping the background build", build.stop)
        intake = Intake(journal, stages, config.watch, on_duplicate=self.metrics.duplicates.inc, faults=self.faults)
        hooks = Hooks(
            model_info=lambda: codec.model_info(model.current),
            status=lambda: codec.status(
                model.current,
                model.generation,
                journal.counts(),
                journal.outbox_depth(),
                uptime_s=time.monotonic() - self.started_at,
                watch_dir=config.watch.dir,
                ready=self.health.ready,
                problems=self.faults.problems(),
                engine_build=build.sentence,
            ),
            problem=self.faults.refusal,
            reload=lambda: codec.reload_answer(model.reload(stages), model.current),
        )
        spool_dir = config.storage.data_dir / "spool"
        service = ScoringService(journal, intake, spool_dir, hooks, self.metrics, config.server)
        server = GrpcServer(service, config.server)
        self.shutdown.add("stopping the server's health", lambda: server.set_serving(False))
        self.shutdown.add("stopping the gRPC server", lambda: server.stop(grace=5.0))
        self.health.tell(server)
        # Read before the server and the watcher start: only what the last run left, never a new input.
        pending = journal.pending()
        spool.drop_unjournaled(spool_dir, {row.path for row in pending if disposal.spooled(row.source)})
        stages.start()
        self.health.watch(stages)
        # DICOM images assembled into series; with pacs.report_per = "series" each series' objects go to the PACS.
        per_series = reports if reports is not None and config.pacs.report_per == "series" else None
        assembler = SeriesAssembler(journal, config.series.stable_s, lambda: stages.scorer, per_series, self.metrics)
        assembler.start()
        self.shutdown.add("stopping the series assembly", assembler.stop)
        self.health.watch(assembler)
        outbox = None
        if config.pacs.enabled:
            outbox = Outbox(journal, config.pacs, self.metrics)
            outbox.start()
            self.shutdown.add("stopping the outbox", lambda: outbox.stop(timeout=OUTBOX_STOP_S))
            self.health.watch(outbox)
        server.start()
        self.metrics.serve(config.server.metrics_host, config.server.metrics_port)
        # In the background: a long backlog must not hold up readiness (submit blocks when stages are full).
        threading.Thread(target=intake.requeue, args=(pending, self.stopping), name="requeue", daemon=True).start()
        folder = FolderIntake(journal, intake, faults=self.faults)
        folder.start()
        self.shutdown.add("stopping the folder's intake", folder.stop)
        self.health.watch(folder)
        exclude = [config.watch.processed_dir, config.watch.rejected_dir, config.storage.data_dir]
        watcher = FolderWatcher(config.watch, folder.offer, exclude, faults=self.faults)
        folder.reconsider = watcher.consider
        watcher.start()
        self.shutdown.add("stopping the watcher", watcher.stop)
        self.health.watch(watcher)
        # What waited in the folder during a fault is taken once it is over: the files offered meanwhile, and a
        # rescan for the rest (files whose move aside failed for want of space).
        self.faults.on_resume(folder.retake)
        self.faults.on_resume(watcher.request_rescan)
        receiver = None
        if config.dicom.enabled:
            receiver = DicomReceiver(
                config.dicom,
                intake,
                spool_dir,
                self.faults,
                config.storage.min_free_mb,
                observer=self.metrics,
                max_file_mb=config.limits.max_file_mb,
            )
            receiver.start()
            self.shutdown.add("stopping the DICOM receiver", receiver.stop)
            self.health.watch(receiver)
        self.faults.check_storage()
        # Where no artifact is gated for this host and inference.build_on_start is on; before readiness, so that
        # GetStatus says so from the first answer.
        build.start(model.current)
        self.health.ready_to_serve()
        served = model.current
        log.info(
            "ready: watching %s%s, gRPC on %s:%d (%s, %s)%s%s, model %s %s on %s",
            config.watch.dir,
            " (polling)" if config.watch.polling else "",
            config.server.host,
            server.port,
            "TLS" if server.tls else "plaintext",
            "terminal tokens required" if config.server.tokens_required else "no tokens",
            f", DICOM {config.dicom.ae_title} on {config.dicom.host}:{receiver.port}" if receiver else "",
            f", reports to {config.pacs.ae_title} at {config.pacs.host}:{config.pacs.port}" if outbox else "",
            served.manifest.model.name,
            served.manifest.model.version,
            served.backend.name,
        )
        return Running(model, stages, folder)

    def _finish_on_stop(self, stages: ScoringStages) -> None:
        """The stop finishes what is in the stages, leaving time for the rest of the stop (pool, batcher,
        journal) inside its bound; should the stop hang, the log says how many inputs stay queued."""
        self.shutdown.add(
            FINISHING,
            lambda: stages.stop(timeout=max(1.0, min(FINISH_IN_FLIGHT_S, self.shutdown.left_s() - 15.0))),
        )
        self._in_flight = stages.in_flight

    def _serving(self, previous: Served | None, now: Served) -> None:
        """The metrics' artifact served: the first, then each one a reload swaps in."""
        if previous is not None:
            self.metrics.serving.labels(previous.backend.name, previous.precision).set(0)
        self.metrics.serving.labels(now.backend.name, now.precision).set(1)
        self.metrics.passed_over.set(now.refused)

    # --- run and stop -------------------------------------------------------------------------------

    def run_forever(self, running: Running) -> None:
        """Serve until SIGTERM/SIGINT, pinging systemd's watchdog only while every part is alive."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.stopping.set()

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            # `systemctl reload`: off the signal handler, which must not block.
            threading.Thread(target=running.reload, name="reload", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        notify("READY=1\nSTATUS=serving")
        interval = watchdog_interval_s()
        # A fault (disk full, watch folder missing) only makes health NOT_SERVING: the process is fine and
        # keeps pinging the watchdog; a dead part is what stops it.
        while not self.stopping.wait(min(interval or CHECK_S, CHECK_S)):
            if not self.health.alive():
                log.error("a pipeline stage has died; stopping so systemd restarts the service")
                break
            self._check(running)
            if interval:
                notify("WATCHDOG=1")
        self.stop()

    def _check(self, running: Running) -> None:
        """The run loop's periodic checks."""
        try:
            self.faults.check_storage()
        except Exception as e:  # the check must never end the run loop
            log.warning("checking free space failed: %s", type(e).__name__)
        self.metrics.held_back.set(running.folder.held_back())
        if self.health.ready:
            self.health.update()

    def stop(self) -> None:
        """Graceful: stop taking files, finish what is in flight, close. Unfinished inputs stay queued.

        Bounded: after STOP_LIMIT_S (well inside systemd's TimeoutStopSec) a part that is stuck is abandoned
        and the process exits; what was in flight stays queued in the journal and is requeued at the next start.
        """
        notify("STOPPING=1")
        self.health.stopping()
        self.stopping.set()
        stuck = self.shutdown.run(STOP_LIMIT_S)
        if stuck is not None:
            log.error(
                "stopping took longer than %.0f s (stuck %s); exiting now: the %d inputs in flight stay queued "
                "in the journal and are scored at the next start",
                STOP_LIMIT_S,
                stuck,
                self._in_flight(),
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)  # the stuck thread can't be stopped; the journal is crash-safe by design
        log.info("stopped")
