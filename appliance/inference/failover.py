"""A remote backend with this host's own best artifact behind it: batches go to the inference servers while any
answers, and to the local artifact while none does, so a server that goes away costs no result (the batch that
failed runs locally at once) and needs nobody to act. The fallback is said in the log, GetStatus's problems and
the faults gauge (health stays SERVING: the appliance serves on); the servers are checked again with back-off
and the remote one serves again once one passes its checks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from appliance.domain.errors import BackendError, ModelMismatchError
from appliance.domain.faults import Faults
from appliance.inference.backend import Backend, Check, Outputs, TensorSpec

log = logging.getLogger(__name__)

FAULT = "inference_server"  # the faults' key (appliance_faults{kind="inference_server"})
IDLE_S = 30.0  # the longest the watch sleeps with every server in the rotation
# The failover that set the fault: across a reload two exist at once, and only the one that set it clears it.
_holder: list[object] = []
_holder_lock = threading.Lock()


@runtime_checkable
class Remote(Protocol):
    """What the failover needs of a remote backend beyond Backend (appliance.inference.backends.triton)."""

    def serving(self) -> bool: ...

    def out_of_rotation(self) -> list[str]: ...

    def next_check_s(self) -> float | None: ...

    def check_again(self) -> list[str]: ...

    def expect_input(self, spec: TensorSpec) -> None: ...

    def on_leave(self, listener: Callable[[], None]) -> None: ...

    def leave_all(self, why: str) -> None: ...


class Failover(Backend):
    def __init__(self, remote: Backend, local: Backend, *, failures: int, faults: Faults | None = None) -> None:
        super().__init__()
        if not isinstance(remote, Remote):
            raise TypeError(f"the {remote.name} backend is not a remote one")
        self.name = remote.name
        self.remote, self.local = remote, local
        self._rotation: Remote = remote
        self._failures_allowed = failures
        self._faults = faults
        self._failures = 0  # batches in a row the remote one failed
        self._largest = 1
        self._sentence = ""
        self._local_now = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="remote-watch", daemon=True)

    # --- the Backend interface -------------------------------------------------------------------------------

    def adopt_check(self, check: Check) -> None:
        self.remote.adopt_check(check)

    def _load_impl(self) -> None:
        """The local artifact first (its input, checked by the loader against the manifest, is what every server's
        must match), then the servers. ModelMismatchError where every server answers with another model."""
        self.local.load()
        self._rotation.expect_input(self.local.input_spec)
        self._rotation.on_leave(self._wake.set)  # a server that left is checked as its back-off ends
        self.remote.load()  # raises where every server answered with a model that is not the export
        self._largest = self.local.max_batch
        if self._rotation.serving():
            self._largest = min(self._largest, self.remote.max_batch)
        else:
            self._fall_back(f"no inference server answers ({'; '.join(self._rotation.out_of_rotation())})")
        self._thread.start()

    def _input_spec_impl(self) -> TensorSpec:
        return self.local.input_spec

    def _max_batch_impl(self) -> int:
        # The servers' largest batch where one answered at load (a server that comes back with a smaller one is
        # sent its batches in pieces).
        return self._largest

    def _artifact_impl(self) -> str:
        return f"{self.remote.artifact}, else {self.local.artifact}"

    def _has_heatmap_impl(self) -> bool:
        return self.remote.has_heatmap if self._rotation.serving() else self.local.has_heatmap

    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        if not self.serving_locally():
            try:
                out = self._on_remote(batch)
            except BackendError as e:
                self._failed(e.message)
            except Exception as e:  # whatever failed there, the batch runs here
                self._failed(f"{type(e).__name__} on the inference servers")
            else:
                with self._lock:
                    self._failures = 0
                return out
        out = self.local.run(batch)
        return Outputs(out.scores, out.heatmap, ran_on=self.local.name)

    def _close_impl(self) -> None:
        self.close_remote()
        self.local.close()

    def close_remote(self) -> None:
        """Stop watching the servers and close their backend, leaving the local artifact loaded."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.remote.close()
        if self.serving_locally():
            self._unsay("the inference servers are no longer used by this model")

    # --- failing over and back -------------------------------------------------------------------------------

    def serving_locally(self) -> bool:
        with self._lock:
            return self._local_now

    def _on_remote(self, batch: np.ndarray) -> Outputs:
        """In pieces no larger than the servers take (they may have come back with a smaller max_batch_size)."""
        largest = self.remote.max_batch
        if len(batch) <= largest:
            return self.remote.run(batch)
        parts = [self.remote.run(batch[i : i + largest]) for i in range(0, len(batch), largest)]
        heatmaps = [p.heatmap for p in parts if p.heatmap is not None]
        heatmap = np.concatenate(heatmaps) if len(heatmaps) == len(parts) else None
        return Outputs(np.concatenate([p.scores for p in parts]), heatmap)

    def _failed(self, why: str) -> None:
        """The batch runs locally now; after ``failures`` in a row, or with no server left, all do."""
        with self._lock:
            self._failures += 1
            failures = self._failures
        if failures >= self._failures_allowed or not self._rotation.serving():
            # Servers still in the rotation gave those failures: each is checked again before it serves again.
            self._rotation.leave_all(f"{failures} batches in a row failed there")
            self._fall_back(why.rstrip("."))
        else:
            log.warning("a batch failed on the inference servers and ran locally: %s", why)

    def _fall_back(self, why: str) -> None:
        sentence = (
            f"Inference runs on this host's {self.local.name} artifact, not the inference servers: {why}; "
            "they are checked again until one answers"
        )
        with self._lock:
            began = not self._local_now
            self._local_now, self._sentence = True, sentence
        self._say(began)
        self._wake.set()

    def _say(self, began: bool) -> None:
        """The fault holds while the local artifact serves: said again at each check; logged once. Nothing once
        closed (a check that outlived the close)."""
        with self._lock:
            if self._stop.is_set():
                return
            sentence = self._sentence
        if self._faults is not None:
            with _holder_lock:
                _holder[:] = [self]
                self._faults.set(FAULT, sentence, degraded=True)
        elif began:
            log.warning("%s", sentence)

    def _unsay(self, sentence: str) -> None:
        """The fault is over, where this failover is the one that said it."""
        if self._faults is None:
            log.warning("%s", sentence)
            return
        with _holder_lock:
            if _holder and _holder[0] is self:
                _holder.clear()
                self._faults.clear(FAULT, sentence)

    def _back(self, servers: list[str]) -> None:
        with self._lock:
            if self._stop.is_set() or not self._local_now:
                return
            self._local_now, self._failures = False, 0
        self._unsay(f"Inference runs on the inference servers again ({', '.join(servers)})")

    def _watch(self) -> None:
        """Checks the servers out of the rotation as their back-off ends; serves remotely again once one passes."""
        while not self._stop.is_set():
            due = self._rotation.next_check_s()
            self._wake.wait(IDLE_S if due is None else min(IDLE_S, due))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                back = self._rotation.check_again()
            except ModelMismatchError as e:
                log.warning("an inference server was refused: %s", e.message)
                continue
            except Exception as e:  # the watch must live on: a failed check is tried again later
                log.warning("checking the inference servers failed: %s", type(e).__name__)
                self._stop.wait(1.0)
                continue
            if self._stop.is_set():
                return
            if back and self.serving_locally():  # a server passed its checks again
                self._back(back)
            elif self.serving_locally():
                self._say(began=False)
