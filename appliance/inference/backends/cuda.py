"""CUDA from Python through cuda-python (`cuda.bindings.runtime`), as NVIDIA's TensorRT samples do.

Every runtime call goes through `check()`, which turns a CUDA error code into a CudaError with the
error's name and text. Buffers and streams are freed by an explicit `close()`, never by `__del__`:
the order of teardown against the CUDA context must be ours, not the garbage collector's.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.domain.errors import BackendError, BackendUnavailable


class CudaError(BackendError):
    """A CUDA runtime call failed."""


# Its major must be the driver's CUDA major: cuda-python 13 on a CUDA 12 driver finds no usable GPU.
INSTALL_HINT = "pip install '.[gpu-cu13]' for a CUDA 13 driver, '.[gpu-cu12]' for a CUDA 12 one"


def runtime() -> Any:
    """The `cuda.bindings.runtime` module, or BackendUnavailable with the reason."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(
            f"cuda-python is not installed ({INSTALL_HINT}); the TensorRT backend needs it."
        ) from e
    return cudart


def check(result: Any) -> Any:
    """Unpack a cuda-python call's (error, *values) tuple; raise CudaError unless it succeeded."""
    cudart = runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name, text = _describe(cudart, err)
        raise CudaError(f"CUDA error {name}: {text}.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _describe(cudart: Any, err: Any) -> tuple[str, str]:
    """An error code's name (cudaErrorNoDevice) and its sentence, as the CUDA runtime gives them."""
    _, name = cudart.cudaGetErrorName(err)
    _, text = cudart.cudaGetErrorString(err)
    return _text(name), _text(text).rstrip(".")


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    # MIG slices and partitioned GPUs share the full GPU's name but not its SMs: tuned kernels differ.
    sm_count: int
    total_memory_bytes: int


def gpu_count() -> int:
    """GPUs the CUDA runtime can use; 0 without cuda-python, a driver or a device (gpu_problem() says which)."""
    try:
        return int(check(runtime().cudaGetDeviceCount()))
    except (BackendUnavailable, CudaError):
        return 0


def gpu_problem() -> str:
    """'' when the CUDA runtime sees a GPU, else one sentence saying why not and what to do.

    Kept apart from gpu_count(): "no GPU" and "a GPU this cuda-python cannot use" need different fixes,
    and the second is silent otherwise (TensorRT just looks absent).
    """
    try:
        cudart = runtime()
    except BackendUnavailable as e:
        return e.message
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # a broken install (a missing libcuda symbol) raises instead of returning a code
        return f"cuda-python could not ask the CUDA driver for GPUs ({type(e).__name__}: {e})."
    if err == cudart.cudaError_t.cudaSuccess:
        return "" if int(count) > 0 else "no CUDA GPU is visible (the CUDA runtime counts 0 devices)."
    name, text = _describe(cudart, err)
    if err == cudart.cudaError_t.cudaErrorNoDevice:
        return f"no CUDA GPU is visible ({name}: {text})."
    try:
        advice = _driver_advice(cudart)
    except Exception as e:  # the advice is a courtesy; the error's name is what matters
        advice = f"the driver's CUDA version is unknown ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return f"{name}: {text}; {advice}."


def _driver_advice(cudart: Any) -> str:
    """Which cuda-python this driver needs, from the CUDA version the driver supports (0 without a driver)."""
    import cuda.bindings

    ours = getattr(cuda.bindings, "__version__", "?")
    err, version = cudart.cudaDriverGetVersion()
    if err != cudart.cudaError_t.cudaSuccess or not version:
        return f"no NVIDIA driver answered; install one, then the cuda-python matching its CUDA major ({INSTALL_HINT})"
    major, minor = int(version) // 1000, int(version) % 1000 // 10
    found = f"this is cuda-python {ours} and the driver supports CUDA {major}.{minor}"
    if major not in (12, 13):  # the extras pyproject.toml offers
        return f"{found}, which the appliance does not support (CUDA 12 or 13 drivers)"
    return f"{found}; install the cuda-python matching your driver's CUDA major: pip install '.[gpu-cu{major}]'"


def gpu_info(index: int = 0) -> GpuInfo:
    props = check(runtime().cudaGetDeviceProperties(index))
    return GpuInfo(
        index=index,
        name=_text(props.name).strip(),
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=int(props.multiProcessorCount),
        total_memory_bytes=int(props.totalGlobalMem),
    )


class Stream:
    def __init__(self) -> None:
        self._cudart = runtime()
        self.handle: Any = check(self._cudart.cudaStreamCreate())

    @property
    def address(self) -> int:
        """The raw cudaStream_t, as TensorRT's execute_async_v3 takes it."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(self._cudart.cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            check(self._cudart.cudaStreamDestroy(self.handle))
            self.handle = None


class PinnedBuffer:
    """Page-locked host memory seen as a flat NumPy array; copies from it can run asynchronously."""

    def __init__(self, count: int, dtype: np.dtype) -> None:
        self._cudart = runtime()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(count) * self.dtype.itemsize
        self.pointer: int | None = int(check(self._cudart.cudaMallocHost(self.nbytes)))
        # Through raw bytes, not a ctypes element type: float16 has none.
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.pointer)
        self.array: np.ndarray = np.frombuffer(memoryview(raw), dtype=self.dtype, count=int(count))

    def close(self) -> None:
        if self.pointer is not None:
            self.array = np.empty(0, self.dtype)  # drop the view before the memory goes
            check(self._cudart.cudaFreeHost(self.pointer))
            self.pointer = None


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self._cudart = runtime()
        self.nbytes = int(nbytes)
        self.pointer: int | None = int(check(self._cudart.cudaMalloc(self.nbytes)))

    def close(self) -> None:
        if self.pointer is not None:
            check(self._cudart.cudaFree(self.pointer))
            self.pointer = None


def copy_to_device(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    cudart = runtime()
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(cudart.cudaMemcpyAsync(dst.pointer, src.pointer, nbytes, kind, stream.handle))


def copy_to_host(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    cudart = runtime()
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(cudart.cudaMemcpyAsync(dst.pointer, src.pointer, nbytes, kind, stream.handle))
