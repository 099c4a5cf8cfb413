"""The daemon's health as grpc.health and the metrics tell it: SERVING only while the daemon is ready, every part
alive and no fault holds back its work. A fault (a full disk, a missing watch folder) keeps the daemon running,
NOT_SERVING, until it is over; a degradation (the inference servers away, this host's artifact scoring instead)
is said among the problems and keeps it SERVING; a part that died is what stops it."""

from __future__ import annotations

import threading
from typing import Protocol

from appliance.api.grpc_server import GrpcServer
from appliance.api.metrics import Metrics
from appliance.domain.faults import Faults


class Part(Protocol):
    def alive(self) -> bool: ...


class Health:
    def __init__(self, metrics: Metrics, faults: Faults) -> None:
        self._metrics = metrics
        self._faults = faults
        self._parts: list[Part] = []
        self._server: GrpcServer | None = None  # where grpc.health is said, once it is built
        self._lock = threading.Lock()  # changes come from whichever thread saw them: one update at a time
        self.ready = False
        faults.subscribe(self.update)

    def watch(self, part: Part) -> None:
        """A part whose threads must live: once one has died, the daemon is not healthy (and exits)."""
        self._parts.append(part)

    def tell(self, server: GrpcServer) -> None:
        """The server whose grpc.health says it."""
        self._server = server

    def alive(self) -> bool:
        return all(part.alive() for part in self._parts)

    def healthy(self) -> bool:
        return self.ready and self.alive() and not self._faults.holding_back()

    def ready_to_serve(self) -> None:
        """Started: health says so (where no fault holds), then the metrics."""
        self.ready = True
        self.update()
        self._metrics.ready.set(1)

    def stopping(self) -> None:
        """Not ready any longer. grpc.health is told by the stop's first step, within its bound."""
        self.ready = False
        self._metrics.ready.set(0)

    def update(self) -> None:
        """Bring the fault gauges and grpc.health in line with the faults that hold now: after every change,
        and from the run loop's checks, so two changes at once cannot leave health saying the older one."""
        with self._lock:
            for kind in self._faults.kinds(seen=True):
                self._metrics.faults.labels(kind).set(1 if self._faults.holds(kind) else 0)
            if self._server is not None:
                self._server.set_serving(self.healthy())
