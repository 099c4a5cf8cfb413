"""The backend interface every inference engine implements (load, input spec, max batch, infer, close), and
what each backend file declares to the registry: its name, settings, availability, artifacts and how it
opens one."""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel

from appliance.domain.errors import BackendError

if TYPE_CHECKING:
    from appliance.domain.manifest import Heatmap as HeatmapSpec
    from appliance.inference.artifacts import Sidecar


@dataclass(frozen=True)
class TensorSpec:
    """A model input as the runtime reports it; the batch axis is None when dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Outputs:
    """One batch's outputs: the scores (N x labels) and, where the model has one and it was asked for, the
    heatmap (N x H x W, float32 in 0..1)."""

    scores: np.ndarray
    heatmap: np.ndarray | None = None
    ran_on: str = ""  # the backend that ran it, where that is not the one served (a remote one's fallback)


# A served artifact's load-time self-check (appliance.inference.self_check.verify on a backend): '' or why not.
Check = Callable[["Backend"], str]


class Backend(abc.ABC):
    """Public methods check state and arguments, then call the ``_*_impl`` a backend overrides.

    Kept narrow (load, spec, batch limit, infer, close) so a remote backend (Triton over KServe v2)
    can implement it too.
    """

    name: str = "base"

    def __init__(self) -> None:
        self._loaded = False

    # --- public API ---------------------------------------------------------------------------

    def load(self) -> None:
        if self._loaded:
            return
        self._load_impl()
        self._loaded = True

    @property
    def input_spec(self) -> TensorSpec:
        self._require_loaded()
        return self._input_spec_impl()

    @property
    def max_batch(self) -> int:
        self._require_loaded()
        return self._max_batch_impl()

    @property
    def artifact(self) -> str:
        """The file this backend runs, for logs and ListModels."""
        return self._artifact_impl()

    @property
    def has_heatmap(self) -> bool:
        """Whether ``run`` returns a heatmap: the manifest declares one, it was asked for, and the artifact has it."""
        self._require_loaded()
        return self._has_heatmap_impl()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (N x sample shape) and return its scores (N x outputs)."""
        return self.run(batch).scores

    def run(self, batch: np.ndarray) -> Outputs:
        """Run one batch (N x sample shape) and return its scores and, where ``has_heatmap``, its heatmap."""
        self._require_loaded()
        spec = self._input_spec_impl()
        if batch.ndim != len(spec.shape):
            raise BackendError(f"Batch has {batch.ndim} axes, the model's input has {len(spec.shape)}.")
        if not 1 <= batch.shape[0] <= self._max_batch_impl():
            raise BackendError(f"Batch of {batch.shape[0]} is outside 1..{self._max_batch_impl()}.")
        if batch.dtype != spec.dtype:
            raise BackendError(f"Batch dtype {batch.dtype} does not match the model's {spec.dtype}.")
        out = self._infer_impl(np.ascontiguousarray(batch))
        for what, array in (("score", out.scores), ("heatmap", out.heatmap)):
            if array is not None and array.shape[0] != batch.shape[0]:
                raise BackendError(f"Backend returned {array.shape[0]} {what} rows for a batch of {batch.shape[0]}.")
        return out

    def adopt_check(self, check: Check) -> None:
        """The self-check of what it serves, handed over before ``load``. A backend that can change what it runs
        while serving (a remote server's model, another server of several) runs it on each before use; the
        others ignore it, and the loader runs it once after loading."""
        return None

    def close(self) -> None:
        if self._loaded:
            self._close_impl()
            self._loaded = False

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise BackendError(f"The {self.name} backend is not loaded; call load() first.")

    # --- what a backend implements --------------------------------------------------------------

    @abc.abstractmethod
    def _load_impl(self) -> None: ...

    @abc.abstractmethod
    def _input_spec_impl(self) -> TensorSpec: ...

    @abc.abstractmethod
    def _max_batch_impl(self) -> int: ...

    @abc.abstractmethod
    def _artifact_impl(self) -> str: ...

    @abc.abstractmethod
    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        """Scores N x labels (float32) and, where the backend has one, the heatmap N x H x W (float32)."""

    def _has_heatmap_impl(self) -> bool:
        return False

    @abc.abstractmethod
    def _close_impl(self) -> None: ...


# --- what a backend file declares ------------------------------------------------------------------


class Why(enum.Enum):
    """Why an artifact was passed over; decides whether an explicit backend may start without it."""

    NO_RUNTIME = "no_runtime"  # the backend's runtime or device is missing on this host
    NONE_BUILT = "none_built"  # nothing in the engines folder for this backend
    OTHER_HOST = "other_host"  # built and gated for another GPU, CPU class or runtime version
    STALE = "stale"  # built from another ONNX file
    DAMAGED = "damaged"  # sidecar or artifact unreadable, missing, truncated or altered


@dataclass(frozen=True)
class PassedOver:
    why: Why
    reason: str
    tier: int = 0  # the backend's tier (BackendKind.tier); the FP32 ONNX is the last tier and never passed over
    # With this backend named in `inference.backend`, whether passing it over refuses the start (the plan
    # `tensorrt` demands; a CPU model that names a quantized artifact it may not serve here) instead of
    # serving what comes next.
    refuses_start: bool = False


@dataclass(frozen=True)
class Choice:
    backend: str  # a registry name
    path: Path
    precision: str
    reason: str
    sidecar: Sidecar | None = None
    tier: int = 2  # as PassedOver.tier


class Opener(Protocol):
    """Opens an artifact, not yet loaded. ``heatmap``: the manifest's heatmap to return beside the scores (the
    artifact has it built in, or, for the FP32 ONNX, the backend adds it as it loads); None for none."""

    def __call__(
        self, path: Path, *, output_name: str, max_batch: int, settings: Any, heatmap: HeatmapSpec | None = None
    ) -> Backend: ...


# A backend's own facts about this host (its runtime's version, its device, the CPU class): what its
# artifacts are keyed to. Only its own files (backend, build target) read them; `selection.Host` holds
# each backend's by name.
Facts = TypeVar("Facts")


@dataclass(frozen=True)
class BackendKind(Generic[Facts]):
    """One backend as `registry.py` lists it, declared once at the end of its own file.

    The loader, the artifact choice, config validation and `make engine` ask this, never a backend's name.
    """

    name: str  # what `inference.backend`, `--target`, sidecars and GetStatus call it
    is_available: Callable[[], str | None]  # None, or the one sentence saying why it cannot run here
    settings: type[BaseModel]  # its own keys: flat under [inference] (as before) or in [inference.<name>]
    open: Opener  # an artifact of its own, not yet loaded
    tier: int  # rank under `auto`: 0 is tried first
    probe: Callable[[Any], Facts]  # its facts about this host, given its settings (the device it would run on)
    # Its best artifact built for this host and, where there is none, why (the reason is '' beside a choice).
    choose: Callable[[Path, str, Facts, Path], tuple[Choice | None, PassedOver]]  # model folder, ONNX sha, FP32 ONNX
    unavailable_on: Callable[[Facts], str]  # '' where this host can run it, else why not (no full stop)
    stem: Callable[[Facts], str]  # its artifacts' file stem in engines/<model>/ for this host
    host_key: Callable[[Facts], dict[str, Any]]  # the ArtifactKey fields that bind its artifacts to this host
    precisions: tuple[str, ...]  # what `make engine` tries, best first, until one passes the gate
    hardware: str  # "CPU", "GPU": for `make engine`'s report
    serves_reference: bool = False  # it also serves the FP32 ONNX itself, the last in every chain
    # It runs the model on other machines (Triton over KServe v2): never chosen by `auto`, built by no `make engine`
    # but exported, and served with this host's own best artifact behind it for when the servers fail.
    remote: bool = False
