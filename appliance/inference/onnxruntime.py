"""ONNX Runtime backend: the CPU default and the numerical reference every other engine is checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import BackendError, BackendUnavailable, ModelMismatchError
from appliance.inference.backend import Backend, TensorSpec

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a hard dependency; kept for a clear message
    ort = None

_ORT_DTYPES: dict[str, np.dtype] = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def is_available() -> bool:
    return ort is not None


def runtime_version() -> str:
    """The installed ONNX Runtime version: part of a CPU artifact's key, as its kernels change with it."""
    return str(ort.__version__) if ort is not None else ""


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, output_name: str, max_batch: int, threads: int = 0) -> None:
        super().__init__()
        self._path = model_path
        self._output_name = output_name
        self._wanted_max_batch = max_batch
        self._threads = threads
        self._session: Any = None
        self._spec: TensorSpec | None = None
        self._max_batch = 1

    def _load_impl(self) -> None:
        if ort is None:
            raise BackendUnavailable("onnxruntime is not installed.")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            options.intra_op_num_threads = self._threads
        # ONNX Runtime's pool threads spin after each run by default, waiting for the next; in the daemon
        # the decode workers need those cycles (measured: 14 ms of CPU per radiograph, a third of it all).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self._path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise BackendError(f"ONNX Runtime could not load {self._path}: {e}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelMismatchError(f"{self._path} has {len(inputs)} inputs; the appliance needs exactly one.")
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise ModelMismatchError(f"{self._path}: input {inp.name!r} is {inp.type}; float or float16 needed.")
        shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self._spec = TensorSpec(name=inp.name, shape=shape, dtype=_ORT_DTYPES[inp.type])
        outputs = [o.name for o in self._session.get_outputs()]
        if self._output_name not in outputs:
            raise ModelMismatchError(
                f"{self._path} has no output named {self._output_name!r} (it has {', '.join(outputs)})."
            )
        # A fixed batch axis of 1 means the model cannot batch, whatever the manifest says.
        self._max_batch = self._wanted_max_batch if shape and shape[0] is None else max(1, shape[0] or 1)

    def _input_spec_impl(self) -> TensorSpec:
        assert self._spec is not None  # set by _load_impl; the base class checks loaded state
        return self._spec

    def _max_batch_impl(self) -> int:
        return self._max_batch

    def _artifact_impl(self) -> str:
        return str(self._path)

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        assert self._spec is not None
        try:
            (out,) = self._session.run([self._output_name], {self._spec.name: batch})
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed on a batch of {batch.shape[0]}: {e}") from e
        return np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)

    def _close_impl(self) -> None:
        self._session = None
