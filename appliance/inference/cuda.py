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

from appliance.errors import BackendError, BackendUnavailable


class CudaError(BackendError):
    """A CUDA runtime call failed."""


def runtime() -> Any:
    """The `cuda.bindings.runtime` module, or BackendUnavailable with the reason."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(
            "cuda-python is not installed (pip install 'appliance[gpu]'); the TensorRT backend needs it."
        ) from e
    return cudart


def check(result: Any) -> Any:
    """Unpack a cuda-python call's (error, *values) tuple; raise CudaError unless it succeeded."""
    cudart = runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"CUDA error {_text(name)}: {_text(text)}.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory_bytes: int


def gpu_count() -> int:
    """GPUs the CUDA runtime can use; 0 without cuda-python, a driver or a device."""
    try:
        return int(check(runtime().cudaGetDeviceCount()))
    except (BackendUnavailable, CudaError):
        return 0


def gpu_info(index: int = 0) -> GpuInfo:
    props = check(runtime().cudaGetDeviceProperties(index))
    return GpuInfo(
        index=index,
        name=_text(props.name).strip(),
        compute_capability=f"{props.major}.{props.minor}",
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
