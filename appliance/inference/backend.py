"""The backend interface every inference engine implements: load, input spec, max batch, infer, close."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from appliance.errors import BackendError


@dataclass(frozen=True)
class TensorSpec:
    """A model input as the runtime reports it; the batch axis is None when dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (N x sample shape) and return the first output (N x outputs)."""
        self._require_loaded()
        spec = self._input_spec_impl()
        if batch.ndim != len(spec.shape):
            raise BackendError(f"Batch has {batch.ndim} axes, the model's input has {len(spec.shape)}.")
        if not 1 <= batch.shape[0] <= self._max_batch_impl():
            raise BackendError(f"Batch of {batch.shape[0]} is outside 1..{self._max_batch_impl()}.")
        if batch.dtype != spec.dtype:
            raise BackendError(f"Batch dtype {batch.dtype} does not match the model's {spec.dtype}.")
        out = self._infer_impl(np.ascontiguousarray(batch))
        if out.shape[0] != batch.shape[0]:
            raise BackendError(f"Backend returned {out.shape[0]} rows for a batch of {batch.shape[0]}.")
        return out

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
    def _infer_impl(self, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _close_impl(self) -> None: ...
