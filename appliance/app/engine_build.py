"""The quantized artifact built while serving (`inference.build_on_start`): where no artifact is gated for this
host, the daemon serves the FP32 model at once and runs `make engine`'s build and gate (`python -m build_engine`)
in a background process at the lowest CPU priority, then swaps what it made in through the reload path
(self-check, warm-up, the swap between batches: no request fails).

A child process, not a thread: the build's ONNX Runtime sessions, calibration and gate would otherwise share the
daemon's GIL and memory, and its crash would be the daemon's. It runs under SCHED_IDLE and nice 19 (`--background`) with
`build_threads` ONNX Runtime threads, so it takes only what scoring leaves idle. A failed gate is recorded
(data_dir/engine-build.json, keyed to the ONNX file, this host's backends and the precision asked for), so it is
not tried again until one of those changes; a build that fails otherwise (it crashed, the disk filled) is tried
again at the next start.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from appliance.config import Config
from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import sha256_file
from appliance.inference.loader import Served
from appliance.inference.selection import Host, choose_artifact
from appliance.scoring.served import Reload

log = logging.getLogger(__name__)

LOG_NAME = "engine-build.log"  # in data_dir: the build's own report, for whoever asks why
RECORD_NAME = "engine-build.json"  # in data_dir: the last failed gate, and what it was keyed to
GATE_FAILED_EXIT = 1  # build_engine's exit status where an explicitly asked precision failed the gate
STOP_WAIT_S = 10.0  # after SIGINT, for the build to remove its work folder, before it is killed
RELOAD_TRIES = 30  # a SIGHUP's reload under way at that moment: try again each second for this long


class State(enum.Enum):
    BUILDING = "building"
    SWAPPED = "swapped"  # the gated artifact serves now
    GATE_FAILED = "gate_failed"  # nothing quantized passed the gate: FP32 serves, recorded for this host
    FAILED = "failed"  # the build did not finish (see engine-build.log); tried again at the next start


class EngineBuild:
    """One background build a start: ``start`` decides and launches it, ``stop`` interrupts it."""

    def __init__(
        self,
        config: Config,
        reload: Callable[[], Reload],
        on_state: Callable[[State], None] = lambda state: None,
    ) -> None:
        """``reload``: the daemon's reload (SIGHUP's), which swaps the new artifact into the stages."""
        self._config = config
        self._reload = reload
        self._on_state = on_state
        self.sentence = ""  # what GetStatus says of it; empty when nothing was needed
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self.log_path = config.storage.data_dir / LOG_NAME
        self.record_path = config.storage.data_dir / RECORD_NAME
        self._key = ""

    def start(self, served: Served) -> None:
        """Build in the background where ``served`` is not the best this host could run and a build may mend it."""
        if not self._config.inference.build_on_start or not served.unbuilt:
            return  # (a remote backend's Served names nothing unbuilt: its servers are not this host's to build)
        self._key = self._build_key(served)
        failed = self._recorded_failure()
        if failed:
            self._set(State.GATE_FAILED, failed)
            return
        meanwhile = f"{served.backend.name} {served.precision} serves meanwhile"
        self._set(State.BUILDING, f"building the quantized artifact for this host in the background "
                                  f"({served.unbuilt[0]}); {meanwhile}")  # fmt: skip
        threading.Thread(target=self._run, name="engine-build", daemon=True).start()

    def stop(self) -> None:
        """Interrupt a build under way (SIGINT: it removes its work folder), killing it if it does not end."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping the background build (it starts again at the next start)")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # --- the build ---------------------------------------------------------------------------------

    def command(self) -> list[str]:
        config = self._config
        return [
            sys.executable, "-m", "build_engine", "--background",
            "--model", str(config.model.dir),
            "--engines", str(config.model.engines_dir),
            "--target", config.inference.backend,  # auto, or the one backend named
            "--precision", config.inference.build_precision,
            "--threads", str(config.inference.build_threads),
            "--device", str(config.inference.device),
        ]  # fmt: skip

    def _run(self) -> None:
        try:
            self._build_and_take()
        except Exception as e:  # whatever happens here, the FP32 model serves on and the status says why
            self._set(State.FAILED, f"the background build failed: {type(e).__name__}: {str(e)[:300]}; the model "
                                    "loaded at the start serves on; it is tried again at the next start")  # fmt: skip

    def _build_and_take(self) -> None:
        started = time.monotonic()
        try:
            rc = self._build()
        except OSError as e:
            self._set(State.FAILED, f"the background build could not start ({e.strerror or e}); "
                                    "run `make engine` by hand")  # fmt: skip
            return
        if self._stopping.is_set():
            return
        minutes = (time.monotonic() - started) / 60
        if rc == GATE_FAILED_EXIT:
            self._gate_failed(f"{self._last_line()} (after {minutes:.1f} min)")
        elif rc != 0:
            self._set(State.FAILED, f"the background build failed (exit {rc}) after {minutes:.1f} min: "
                                    f"{self._last_line()}; see {self.log_path}; it is tried again at the next "
                                    "start")  # fmt: skip
        else:
            self._take(minutes)

    def _build(self) -> int:
        config = self._config
        threads = str(config.inference.build_threads)
        env = {**os.environ, "APPLIANCE_NO_PROGRESS": "1", "OMP_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}  # fmt: skip
        log.info("background build: %s", " ".join(self.command()[1:]))
        with open(self.log_path, "wb") as out:
            with self._lock:
                if self._stopping.is_set():
                    return -1
                # cwd: the data folder, so the build reads no stray appliance.toml; the model and engines are named.
                self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, env=env,
                                              cwd=config.storage.data_dir)  # fmt: skip
            return self._proc.wait()

    def _take(self, minutes: float) -> None:
        """The build finished: swap in what it gated, or say why FP32 still serves."""
        config = self._config
        loaded = load_manifest(config.model.dir)
        best = choose_artifact(loaded, config.inference, config.model.engines_dir).chain[0]
        if best.path == loaded.onnx_path:
            # The build's FP32 record for this host says why (no INT8 within the gate, or one slower than FP32).
            notes = best.sidecar.notes if best.sidecar is not None else []
            why = next((n for n in notes if "the gate" in n), "nothing quantized passed the accuracy gate")
            self._gate_failed(f"{why} (after {minutes:.1f} min)")
            return
        for _ in range(RELOAD_TRIES):
            answer = self._reload()
            if not answer.under_way or self._stopping.wait(1.0):
                break
        if answer.reloaded:
            self._set(State.SWAPPED, f"built in the background in {minutes:.1f} min and swapped in: {answer.message}")
        else:
            self._set(State.FAILED, f"built in the background in {minutes:.1f} min but not swapped in: "
                                    f"{answer.message}")  # fmt: skip

    def _gate_failed(self, why: str) -> None:
        sentence = (f"the background build serves no quantized model here: {why}; FP32 serves, and the build is not "
                    "tried again until the model, this host or inference.build_precision changes")  # fmt: skip
        record = {"key": self._key, "sentence": sentence, "unix_time": time.time()}
        try:
            self.record_path.write_text(json.dumps(record), encoding="utf-8")
        except OSError as e:
            log.warning("could not record the failed gate (%s): the build runs again at the next start", e.strerror)
        self._set(State.GATE_FAILED, sentence)

    def _recorded_failure(self) -> str:
        """The sentence of a failed gate recorded under the same key, or ''."""
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        if not isinstance(record, dict) or record.get("key") != self._key:
            return ""
        return str(record.get("sentence", ""))

    def _build_key(self, served: Served) -> str:
        """What a failed gate depends on: the ONNX file, each backend's facts about this host, the precision."""
        config = self._config
        facts = {name: repr(value) for name, value in Host.probe(config.inference).facts.items()}
        text = json.dumps([sha256_file(served.loaded.onnx_path), facts, config.inference.build_precision],
                          sort_keys=True)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def _last_line(self) -> str:
        """The build's last words (its error sentence): the build reads only the model's own images, no patient's."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no output"
        return lines[-1][:300] if lines else "no output"

    def _set(self, state: State, sentence: str) -> None:
        self.sentence = sentence
        level = logging.WARNING if state in (State.FAILED, State.GATE_FAILED) else logging.INFO
        log.log(level, "%s", sentence)
        self._on_state(state)
