"""TensorRT backend: runs a serialized plan that `make engine` built for this GPU and TensorRT version.

Written against the TensorRT 10 Python API, which TensorRT 11 keeps for everything used here
(name-based I/O tensors, `set_input_shape`, `set_tensor_address`, `execute_async_v3`). Each slot is one
execution context on its own CUDA stream with page-locked host and device buffers sized for the max
batch; two slots let one batch's copies overlap the other's compute when two threads call `infer`.
Every output gets a device buffer (TensorRT refuses to enqueue with any I/O address unset); the
manifest's output is copied back, and so is its heatmap where it was asked for and the plan has it
(`make engine` builds it in, its layers in float32). A slot goes back to the pool only once its stream
is idle, and `close()` waits for lent slots before freeing anything.

Its artifacts are plans named and keyed for one GPU model, SM count and TensorRT version
(`engines/<model>/tensorrt-<gpu>-sm<cc>-<n>mp.json` beside them). `tensorrt` and `cuda` are imported only
when a plan is loaded or the host probed, so this module imports on a box without them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from appliance.domain.errors import BackendError, BackendUnavailable, ModelMismatchError
from appliance.domain.manifest import Heatmap as HeatmapSpec
from appliance.inference.artifacts import SidecarError, artifact_problem, read_sidecar, slug
from appliance.inference.backend import Backend, BackendKind, Choice, Outputs, PassedOver, TensorSpec, Why
from appliance.inference.backends import cuda

log = logging.getLogger(__name__)

NAME = "tensorrt"
TIER = 0

SLOTS = 2
# How long close() waits for each lent slot. A batch takes milliseconds; one busy this long is stuck,
# and its buffers are left allocated rather than freed under it.
DRAIN_S = 5.0


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


class TensorRtSettings(BaseModel):
    """`inference.device` (as before), or `[inference.tensorrt] device`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: int = Field(0, ge=0, description="The CUDA device index TensorRT runs on (0: the first GPU).")


def gpu_problem(device: int = 0) -> str:
    """'' when CUDA device `device` is usable here, else why not (one phrase, no full stop)."""
    problem = cuda.gpu_problem().rstrip(".")
    if not problem and device >= cuda.gpu_count():
        problem = f"CUDA device {device} does not exist (this host has {cuda.gpu_count()}; see inference.device)"
    return problem


def is_available(device: int = 0) -> str | None:
    """None where TensorRT imports and the GPU is usable, else the sentence saying which is missing."""
    if not tensorrt_version():
        return "TensorRT is not installed on this host."
    problem = gpu_problem(device)
    return f"{problem[0].upper()}{problem[1:]}." if problem else None


@dataclass(frozen=True)
class TensorRtHost:
    """This host as a plan is keyed to it: the TensorRT version and the GPU (none where `gpu_problem` says why)."""

    tensorrt_version: str  # '' where TensorRT does not import
    gpu_name: str
    compute_capability: str
    sm_count: int = 0
    gpu_problem: str = ""


def probe(settings: TensorRtSettings) -> TensorRtHost:
    version = tensorrt_version()
    if not version:
        return TensorRtHost(version, "", "")
    problem = gpu_problem(settings.device)
    if problem:
        return TensorRtHost(version, "", "", gpu_problem=problem)
    gpu = cuda.gpu_info(settings.device)
    return TensorRtHost(version, gpu.name, gpu.compute_capability, gpu.sm_count)


def unavailable_on(host: TensorRtHost) -> str:
    """Why this host cannot run TensorRT plans; '' if it can."""
    if not host.tensorrt_version:
        return "TensorRT is not installed on this host"
    if not host.gpu_name:
        return host.gpu_problem or "no CUDA GPU is visible on this host"
    return ""


def tensorrt_stem(gpu_name: str, compute_capability: str, sm_count: int = 0) -> str:
    """One plan per GPU model in a folder, so boxes with different GPUs can share an engines folder. The
    multiprocessor count tells apart GPUs that share a name: Jetson Orin modules, MIG slices."""
    mp = f"-{sm_count}mp" if sm_count else ""
    return f"{NAME}-{slug(gpu_name)}-sm{compute_capability.replace('.', '')}{mp}"


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
    device_outs: dict[str, cuda.DeviceBuffer]  # every output tensor, the manifest's among them
    host_heatmap: cuda.PinnedBuffer | None = None  # where the heatmap is returned

    def settle(self) -> None:
        """Wait until this slot's stream has nothing queued, so its buffers can take the next batch.

        Called after an error: the copy in or the engine may still be running. A failure here is
        logged, not raised, so the error that brought us here is the one the caller sees.
        """
        try:
            self.stream.synchronize()
        except cuda.CudaError as e:
            log.error("TensorRT slot: waiting for its stream after a failed batch also failed: %s", e)

    def close(self) -> None:
        parts: list[cuda.PinnedBuffer | cuda.DeviceBuffer | cuda.Stream]
        parts = [self.host_in, self.device_in, self.host_out, *self.device_outs.values(), self.stream]
        if self.host_heatmap is not None:
            parts.append(self.host_heatmap)
        for part in parts:
            try:
                part.close()
            except cuda.CudaError as e:  # free the rest regardless: one failure must not leak them all
                log.error("TensorRT slot: freeing a buffer failed: %s", e)
        # The context holds its engine (and that its runtime) alive, so contexts go before engines.
        self.context = None


class _SlotPool:
    """Lends slots one batch at a time; closing waits for lent slots before anything is freed."""

    def __init__(self, slots: list[_Slot]) -> None:
        self._slots = list(slots)
        self._free = list(slots)
        self._cond = threading.Condition()
        self._closing = False  # take() refuses from now on
        self._drained = False  # close() is past waiting: slots given back later are freed by the giver

    def take(self) -> _Slot:
        with self._cond:
            while not self._free and not self._closing:
                self._cond.wait()
            if self._closing:
                raise BackendError("The TensorRT backend is closed.")
            return self._free.pop()

    def give_back(self, slot: _Slot) -> None:
        with self._cond:
            if not self._drained:
                self._free.append(slot)
                self._cond.notify_all()
                return
        # close() stopped waiting for this batch and left the slot allocated; its stream is idle now.
        slot.close()

    def close(self, wait_per_slot_s: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # a take() waiting for a slot raises instead of waiting on
            deadline = time.monotonic() + wait_per_slot_s * len(self._slots)
            while len(self._free) < len(self._slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            idle, self._free = self._free, []
            self._drained = True
        busy = len(self._slots) - len(idle)
        if busy:
            log.warning(
                "closing the TensorRT backend: %d of %d slots still busy after %g s; their buffers stay "
                "allocated (freed when their batch ends) rather than freed under a running batch",
                busy,
                len(self._slots),
                wait_per_slot_s * len(self._slots),
            )
        for slot in idle:
            slot.settle()
            slot.close()


class TensorRtBackend(Backend):
    name = "tensorrt"

    def __init__(
        self, plan_path: Path, *, output_name: str, max_batch: int, device: int = 0, heatmap: HeatmapSpec | None = None
    ) -> None:
        super().__init__()
        self._path = plan_path
        self._output_name = output_name
        self._heatmap = heatmap
        self._heatmap_name = ""  # the heatmap's output, where it was asked for and the plan has it
        self._heatmap_shape: tuple[int, ...] = ()  # H x W
        self._wanted_max_batch = max_batch
        self._device = device
        self._runtime: Any = None
        self._engine: Any = None
        self._spec: TensorSpec | None = None
        self._outputs: list[str] = []
        self._sample_shape: tuple[int, ...] = ()
        self._max_batch = 1
        self._out_width = 0
        self._pool: _SlotPool | None = None

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
            self._runtime = None
            raise ModelMismatchError(
                f"TensorRT {trt.__version__} cannot load {self._path}: it is truncated or was built by another "
                "TensorRT version; run `make engine` to rebuild it."
            )
        slots: list[_Slot] = []
        try:
            self._describe(trt)
            for _ in range(SLOTS):
                slots.append(self._make_slot())
        except BaseException:
            for slot in slots:
                slot.close()
            self._engine = None
            self._runtime = None
            raise
        self._pool = _SlotPool(slots)

    def _describe(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ModelMismatchError(f"{self._path} has {len(inputs)} inputs; the appliance needs exactly one.")
        if self._output_name not in self._outputs:
            raise ModelMismatchError(f"{self._path} has no output named {self._output_name!r}.")
        name = inputs[0]
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output_name)))
        except TypeError as e:  # BF16, FP8, INT4... at the plan's edge: NumPy has no such type
            raise ModelMismatchError(f"{self._path}: an input or output type has no NumPy equivalent ({e}).") from e
        if out_dtype != np.float32:
            raise ModelMismatchError(f"{self._path}: output {self._output_name!r} is {out_dtype}; float32 needed.")
        self._heatmap_name = self._heatmap_output(trt, self._heatmap.output) if self._heatmap is not None else ""
        shape = tuple(engine.get_tensor_shape(name))
        if any(int(d) < 0 for d in shape[1:]):
            raise ModelMismatchError(f"{self._path}: only the batch axis may be dynamic; the input is {list(shape)}.")
        _, _, max_shape = engine.get_tensor_profile_shape(name, 0)
        self._max_batch = max(1, min(self._wanted_max_batch, int(max_shape[0])))
        self._sample_shape = tuple(int(d) for d in shape[1:])
        self._spec = TensorSpec(name=name, shape=(None, *self._sample_shape), dtype=dtype)

    def _heatmap_output(self, trt: Any, name: str) -> str:
        """`name` where the plan has that output (float32), else '' with a warning: a plan built before the
        manifest declared a heatmap is served without one."""
        if name not in self._outputs:
            log.warning(
                "%s was built without the manifest's heatmap; results carry none until `make engine` rebuilds it",
                self._path.name,
            )
            return ""
        dtype = self._engine.get_tensor_dtype(name)
        if dtype != trt.DataType.FLOAT:
            raise ModelMismatchError(f"{self._path}: output {name!r} is {dtype}; the heatmap must be float32.")
        return name

    def _output_bytes(self, context: Any, name: str) -> tuple[tuple[int, ...], int]:
        """An output's shape at the max batch and the bytes it needs (types NumPy lacks included)."""
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise ModelMismatchError(f"{self._path}: output {name!r} has a shape that depends on the data {shape}.")
        itemsize = self._engine.get_tensor_dtype(name).itemsize  # a fraction of a byte for INT4/FP4
        if itemsize is None:
            raise ModelMismatchError(f"{self._path}: output {name!r} has a type of unknown size.")
        return shape, max(1, math.ceil(math.prod(shape) * itemsize))

    def _make_slot(self) -> _Slot:
        spec = self._spec
        if spec is None:
            raise BackendError("The TensorRT plan was not described before its slots were made.")
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self._path} (GPU memory?).")
        sample = math.prod(self._sample_shape)
        # At the max batch every output has its largest shape, so each buffer is sized once.
        if not context.set_input_shape(spec.name, (self._max_batch, *self._sample_shape)):
            raise ModelMismatchError(f"{self._path}: the plan does not accept a batch of {self._max_batch}.")
        sizes = {name: self._output_bytes(context, name) for name in self._outputs}
        out_shape = sizes[self._output_name][0]
        self._out_width = math.prod(out_shape[1:]) if len(out_shape) > 1 else 1
        if self._heatmap_name:
            heat_shape = sizes[self._heatmap_name][0]
            if len(heat_shape) != 3:
                raise ModelMismatchError(f"{self._path}: the heatmap is {list(heat_shape)}, not N x H x W.")
            self._heatmap_shape = heat_shape[1:]
        made: list[cuda.Stream | cuda.PinnedBuffer | cuda.DeviceBuffer] = []
        try:
            stream = cuda.Stream()
            made.append(stream)
            host_in = cuda.PinnedBuffer(self._max_batch * sample, spec.dtype)
            made.append(host_in)
            device_in = cuda.DeviceBuffer(host_in.nbytes)
            made.append(device_in)
            host_out = cuda.PinnedBuffer(self._max_batch * self._out_width, np.dtype(np.float32))
            made.append(host_out)
            host_heatmap = None
            if self._heatmap_name:
                cells = self._max_batch * math.prod(self._heatmap_shape)
                host_heatmap = cuda.PinnedBuffer(cells, np.dtype(np.float32))
                made.append(host_heatmap)
            device_outs: dict[str, cuda.DeviceBuffer] = {}
            for name, (_, nbytes) in sizes.items():
                device_outs[name] = cuda.DeviceBuffer(nbytes)
                made.append(device_outs[name])
        except BaseException:
            for part in made:  # a failed allocation frees what this slot already holds
                part.close()
            raise
        # Buffers are sized for the max batch, so addresses are set once; only the shape changes per batch.
        context.set_tensor_address(spec.name, device_in.pointer)
        for name, buffer in device_outs.items():
            context.set_tensor_address(name, buffer.pointer)
        return _Slot(context, stream, host_in, device_in, host_out, device_outs, host_heatmap)

    def _input_spec_impl(self) -> TensorSpec:
        if self._spec is None:
            raise BackendError("The TensorRT backend is not loaded.")
        return self._spec

    def _max_batch_impl(self) -> int:
        return self._max_batch

    def _artifact_impl(self) -> str:
        return str(self._path)

    def _has_heatmap_impl(self) -> bool:
        return bool(self._heatmap_name)

    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        spec, pool = self._spec, self._pool
        if spec is None or pool is None:  # closed by another thread since Backend.infer checked
            raise BackendError("The TensorRT backend is closed.")
        # The current device is per thread; the batcher's thread is not the one that loaded the plan.
        cuda.check(cuda.runtime().cudaSetDevice(self._device))
        slot = pool.take()
        try:
            return self._run(slot, spec.name, batch)
        except BaseException:
            # The copy in or the engine may still be running on this slot's stream; the next batch
            # given this slot would overwrite pinned input still being read.
            slot.settle()
            raise
        finally:
            pool.give_back(slot)

    def _run(self, slot: _Slot, input_name: str, batch: np.ndarray) -> Outputs:
        n = batch.shape[0]
        out_count = n * self._out_width
        heat_count = n * math.prod(self._heatmap_shape)
        slot.host_in.array[: batch.size] = batch.reshape(-1)
        if not slot.context.set_input_shape(input_name, batch.shape):
            raise BackendError(f"TensorRT refused the input shape {list(batch.shape)}.")
        cuda.copy_to_device(slot.device_in, slot.host_in, batch.nbytes, slot.stream)
        if not slot.context.execute_async_v3(slot.stream.address):
            raise BackendError(f"TensorRT failed to enqueue a batch of {n}; its log above says why.")
        cuda.copy_to_host(slot.host_out, slot.device_outs[self._output_name], out_count * 4, slot.stream)
        if slot.host_heatmap is not None:
            cuda.copy_to_host(slot.host_heatmap, slot.device_outs[self._heatmap_name], heat_count * 4, slot.stream)
        slot.stream.synchronize()
        # Copy out: the pinned buffers are reused by the next batch.
        scores = slot.host_out.array[:out_count].reshape(n, self._out_width).copy()
        if slot.host_heatmap is None:
            return Outputs(scores)
        return Outputs(scores, slot.host_heatmap.array[:heat_count].reshape(n, *self._heatmap_shape).copy())

    def _close_impl(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(DRAIN_S)
        # A slot still busy holds its context, which holds the engine and runtime alive until it is freed.
        self._engine = None
        self._runtime = None


def open_artifact(
    path: Path, *, output_name: str, max_batch: int, settings: TensorRtSettings, heatmap: HeatmapSpec | None = None
) -> Backend:
    return TensorRtBackend(path, output_name=output_name, max_batch=max_batch, device=settings.device, heatmap=heatmap)


# --- which plan this host may serve ------------------------------------------------------------------


def tensorrt_choice(
    folder: Path, onnx_sha: str, host: TensorRtHost, onnx_path: Path | None = None
) -> tuple[Choice | None, PassedOver]:
    """The plan built for this GPU and TensorRT version, or why there is none; `backend = "tensorrt"` refuses to
    start without one, so every passing-over here refuses the start."""
    problem = unavailable_on(host)
    if problem:
        return None, PassedOver(Why.NO_RUNTIME, problem, tier=TIER, refuses_start=True)
    sidecars = sorted(folder.glob(f"{NAME}-*.json"))
    if not sidecars:
        return None, PassedOver(
            Why.NONE_BUILT, f"no TensorRT plan in {folder}; run `make engine` to build one", TIER, True
        )
    mine = folder / f"{tensorrt_stem(host.gpu_name, host.compute_capability, host.sm_count)}.json"
    if mine not in sidecars:
        others = []
        for path in sidecars:
            try:
                key = read_sidecar(path).key
                others.append(f"{key.gpu_name} (compute {key.compute_capability}, {key.sm_count} SMs)")
            except SidecarError:
                others.append(path.name)
        return None, PassedOver(
            Why.OTHER_HOST,
            f"the TensorRT plans in {folder} were built for {', '.join(others)}, not this {host.gpu_name} "
            f"(compute {host.compute_capability}, {host.sm_count} SMs); run `make engine` to build one for this GPU",
            TIER,
            True,
        )
    try:
        sidecar = read_sidecar(mine)
    except SidecarError as e:
        return None, PassedOver(Why.DAMAGED, f"{e}; run `make engine` to rebuild the plan", TIER, True)
    key = sidecar.key
    plan = folder / sidecar.artifact
    if key.tensorrt_version != host.tensorrt_version:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"{plan.name} was built with TensorRT {key.tensorrt_version}, this host has "
            f"{host.tensorrt_version}; run `make engine` to rebuild it",
            TIER,
            True,
        )
    if key.sm_count != host.sm_count:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"{plan.name} was built for a {key.gpu_name} with {key.sm_count} multiprocessors, this one has "
            f"{host.sm_count} (another module of the same name, a MIG slice or a partition); run `make engine` to "
            "build one for it",
            TIER,
            True,
        )
    if key.onnx_sha256 != onnx_sha:
        return None, PassedOver(
            Why.STALE,
            f"{plan.name} was built from another version of the model's ONNX file; run `make engine`",
            TIER,
            True,
        )
    problem = artifact_problem(plan, sidecar)
    if problem:
        return None, PassedOver(Why.DAMAGED, problem, TIER, True)
    reason = f"{key.precision} plan built for this {host.gpu_name}"
    return Choice(NAME, plan, key.precision, reason, sidecar, tier=TIER), PassedOver(Why.NONE_BUILT, "")


def _host_key(host: TensorRtHost) -> dict[str, Any]:
    return {
        "gpu_name": host.gpu_name,
        "compute_capability": host.compute_capability,
        "sm_count": host.sm_count,
        "tensorrt_version": host.tensorrt_version,
    }


KIND = BackendKind(
    name=NAME,
    is_available=is_available,
    settings=TensorRtSettings,
    open=open_artifact,
    tier=TIER,
    probe=probe,
    choose=tensorrt_choice,
    unavailable_on=unavailable_on,
    stem=lambda host: tensorrt_stem(host.gpu_name, host.compute_capability, host.sm_count),
    host_key=_host_key,
    precisions=("int8", "fp16", "fp32"),
    hardware="GPU",
)
