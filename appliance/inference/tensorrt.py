"""TensorRT backend: runs a serialized plan that `make engine` built for this GPU and TensorRT version.

Written against the TensorRT 10 Python API, which TensorRT 11 keeps for everything used here
(name-based I/O tensors, `set_input_shape`, `set_tensor_address`, `execute_async_v3`). Each slot is one
execution context on its own CUDA stream with page-locked host and device buffers sized for the max
batch; two slots let one batch's copies overlap the other's compute when two threads call `infer`.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import BackendError, BackendUnavailable, ModelMismatchError
from appliance.inference import cuda
from appliance.inference.backend import Backend, TensorSpec

log = logging.getLogger(__name__)

SLOTS = 2


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("TensorRT is not installed on this host.") from e
    return trt


def tensorrt_version() -> str:
    """The installed TensorRT version, or '' where it does not import."""
    try:
        return str(import_tensorrt().__version__)
    except BackendUnavailable:
        return ""


_logger: Any = None


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that speaks through ours, so parser and builder errors reach the journal.

    One per process: TensorRT keeps the first logger it is given for every later builder and runtime.
    """
    global _logger
    if _logger is None:
        _logger = _new_logger(trt)
    return _logger


def _new_logger(trt: Any) -> Any:

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


@dataclass
class _Slot:
    context: Any
    stream: cuda.Stream
    host_in: cuda.PinnedBuffer
    device_in: cuda.DeviceBuffer
    host_out: cuda.PinnedBuffer
    device_out: cuda.DeviceBuffer

    def close(self) -> None:
        for part in (self.host_in, self.device_in, self.host_out, self.device_out, self.stream):
            part.close()
        self.context = None


class TensorRtBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan_path: Path, *, output_name: str, max_batch: int, device: int = 0) -> None:
        super().__init__()
        self._path = plan_path
        self._output_name = output_name
        self._wanted_max_batch = max_batch
        self._device = device
        self._runtime: Any = None
        self._engine: Any = None
        self._spec: TensorSpec | None = None
        self._sample_shape: tuple[int, ...] = ()
        self._max_batch = 1
        self._out_width = 0
        self._slots: list[_Slot] = []
        self._free: queue.Queue[_Slot] = queue.Queue()

    def _load_impl(self) -> None:
        trt = import_tensorrt()
        cudart = cuda.runtime()
        cuda.check(cudart.cudaSetDevice(self._device))
        try:
            data = self._path.read_bytes()
        except OSError as e:
            raise BackendError(f"Cannot read the TensorRT plan {self._path}: {e.strerror}.") from e
        self._runtime = trt.Runtime(make_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise ModelMismatchError(
                f"TensorRT {trt.__version__} cannot load {self._path}: it is truncated or was built by another "
                "TensorRT version; run `make engine` to rebuild it."
            )
        try:
            self._describe(trt)
            for _ in range(SLOTS):
                slot = self._make_slot()
                self._slots.append(slot)
                self._free.put(slot)
        except BaseException:
            self._close_impl()
            raise

    def _describe(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ModelMismatchError(f"{self._path} has {len(inputs)} inputs; the appliance needs exactly one.")
        if self._output_name not in names:
            raise ModelMismatchError(f"{self._path} has no output named {self._output_name!r}.")
        name = inputs[0]
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output_name)))
        except TypeError as e:  # BF16, FP8, INT4... at the plan's edge: NumPy has no such type
            raise ModelMismatchError(f"{self._path}: an input or output type has no NumPy equivalent ({e}).") from e
        if out_dtype != np.float32:
            raise ModelMismatchError(f"{self._path}: output {self._output_name!r} is {out_dtype}; float32 needed.")
        shape = tuple(engine.get_tensor_shape(name))
        if any(int(d) < 0 for d in shape[1:]):
            raise ModelMismatchError(f"{self._path}: only the batch axis may be dynamic; the input is {list(shape)}.")
        _, _, max_shape = engine.get_tensor_profile_shape(name, 0)
        self._max_batch = max(1, min(self._wanted_max_batch, int(max_shape[0])))
        self._sample_shape = tuple(int(d) for d in shape[1:])
        self._spec = TensorSpec(name=name, shape=(None, *self._sample_shape), dtype=dtype)

    def _make_slot(self) -> _Slot:
        assert self._spec is not None
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self._path} (GPU memory?).")
        sample = int(np.prod(self._sample_shape))
        if not context.set_input_shape(self._spec.name, (self._max_batch, *self._sample_shape)):
            raise ModelMismatchError(f"{self._path}: the plan does not accept a batch of {self._max_batch}.")
        out_shape = tuple(context.get_tensor_shape(self._output_name))
        if any(int(d) < 0 for d in out_shape):
            raise ModelMismatchError(f"{self._path}: the output shape {list(out_shape)} depends on the data.")
        self._out_width = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
        made: list[cuda.Stream | cuda.PinnedBuffer | cuda.DeviceBuffer] = []
        try:
            stream = cuda.Stream()
            made.append(stream)
            host_in = cuda.PinnedBuffer(self._max_batch * sample, self._spec.dtype)
            made.append(host_in)
            device_in = cuda.DeviceBuffer(host_in.nbytes)
            made.append(device_in)
            host_out = cuda.PinnedBuffer(self._max_batch * self._out_width, np.dtype(np.float32))
            made.append(host_out)
            device_out = cuda.DeviceBuffer(host_out.nbytes)
            made.append(device_out)
        except BaseException:
            for part in made:  # a failed allocation frees what this slot already holds
                part.close()
            raise
        # Buffers are sized for the max batch, so addresses are set once; only the shape changes per batch.
        context.set_tensor_address(self._spec.name, device_in.pointer)
        context.set_tensor_address(self._output_name, device_out.pointer)
        return _Slot(context, stream, host_in, device_in, host_out, device_out)

    def _input_spec_impl(self) -> TensorSpec:
        assert self._spec is not None
        return self._spec

    def _max_batch_impl(self) -> int:
        return self._max_batch

    def _artifact_impl(self) -> str:
        return str(self._path)

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        assert self._spec is not None
        n = batch.shape[0]
        # The current device is per thread; the batcher's thread is not the one that loaded the plan.
        cuda.check(cuda.runtime().cudaSetDevice(self._device))
        slot = self._free.get()
        try:
            in_count = batch.size
            out_count = n * self._out_width
            slot.host_in.array[:in_count] = batch.reshape(-1)
            if not slot.context.set_input_shape(self._spec.name, batch.shape):
                raise BackendError(f"TensorRT refused the input shape {list(batch.shape)}.")
            cuda.copy_to_device(slot.device_in, slot.host_in, batch.nbytes, slot.stream)
            if not slot.context.execute_async_v3(slot.stream.address):
                raise BackendError(f"TensorRT failed to enqueue a batch of {n}.")
            cuda.copy_to_host(slot.host_out, slot.device_out, out_count * 4, slot.stream)
            slot.stream.synchronize()
            # Copy out: the pinned buffer is reused by the next batch.
            return slot.host_out.array[:out_count].reshape(n, self._out_width).copy()
        finally:
            self._free.put(slot)

    def _close_impl(self) -> None:
        # Contexts before the engine before the runtime, as TensorRT requires.
        for slot in self._slots:
            slot.close()
        self._slots.clear()
        self._free = queue.Queue()
        self._engine = None
        self._runtime = None
