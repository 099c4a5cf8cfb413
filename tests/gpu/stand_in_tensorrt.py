"""A stand-in `tensorrt` module: exactly what TensorRtBackend uses, around an engine whose
`execute_async_v3` runs a real CUDA computation (CuPy) on the stream it is given.

It lets the backend's slots, streams, pinned and device buffers and copies be tested for real on a GPU
where TensorRT itself is not installed (common cloud images): a missed synchronization gives wrong rows,
a buffer freed under a running batch a CUDA error or garbage. The engine: input "images" [N, 3, 8, 8]
float32 (N in 1..8); outputs "features" [N, 3] float16 (each channel's mean), "scores" [N, 2] float32
(twice the sample's sum, the sample's max) and "heatmap" [N, 8, 8] float32 (each pixel's largest channel),
"features" first so the manifest's output is not output 0.
Like TensorRT, it refuses to enqueue while any I/O tensor has no address.
"""

from __future__ import annotations

import enum
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN = b"stand-in TensorRT plan"
SAMPLE = (3, 8, 8)
MAX_BATCH = 8
SHAPES = {"images": (-1, *SAMPLE), "features": (-1, 3), "scores": (-1, 2), "heatmap": (-1, *SAMPLE[1:])}

# Holds the stream for a while on the GPU, not the CPU: the host returns at once, as from a real engine.
_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def expected_scores(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return np.stack([flat.sum(axis=1) * 2, flat.max(axis=1)], axis=1).astype(np.float32)


def expected_heatmap(x: np.ndarray) -> np.ndarray:
    return x.max(axis=1).astype(np.float32)


@dataclass
class Behaviour:
    """What the next batches do (the test sets it between batches) and what they did."""

    spin_ns: int = 0  # GPU time each batch spends before it writes its outputs
    fail_next: bool = False  # the next execute_async_v3 enqueues its work, then returns False
    enqueued: threading.Event = field(default_factory=threading.Event)
    streams: list[int] = field(default_factory=list)  # the stream of every batch enqueued, in order
    last: Any = None  # the context that ran the last batch


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.value).itemsize


def nptype(trt_type: DataType) -> type:
    return np.dtype(trt_type.value).type


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self) -> None:
        pass


def make_module() -> tuple[types.ModuleType, Behaviour]:
    """A fresh `tensorrt` stand-in (to put into sys.modules) and the behaviour its engines follow."""
    import cupy

    spin = cupy.RawKernel(_SPIN, "spin")
    spin.compile()  # once, here, rather than racing in two batch threads
    behaviour = Behaviour()

    class Context:
        def __init__(self) -> None:
            self.batch = -1
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            dims = tuple(int(d) for d in shape)
            if name != "images" or dims[1:] != SAMPLE or not 1 <= dims[0] <= MAX_BATCH:
                return False
            self.batch = dims[0]
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.batch, *SHAPES[name][1:])

        def set_tensor_address(self, name: str, memory: int) -> bool:
            self.addresses[name] = int(memory)
            return True

        def view(self, name: str, dtype: type) -> Any:
            """The tensor's device memory at the current batch, as a CuPy array on the current stream."""
            shape = self.get_tensor_shape(name)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            memory = cupy.cuda.UnownedMemory(self.addresses[name], nbytes, self, 0)
            return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))

        def execute_async_v3(self, stream_handle: int) -> bool:
            if self.batch < 1 or set(self.addresses) != set(SHAPES):
                return False
            with cupy.cuda.ExternalStream(int(stream_handle)):
                if behaviour.spin_ns:
                    spin((1,), (1,), (np.uint64(behaviour.spin_ns),))
                x = self.view("images", np.float32)
                flat = x.reshape(self.batch, -1)
                scores = self.view("scores", np.float32)
                scores[:, 0] = flat.sum(axis=1) * 2
                scores[:, 1] = flat.max(axis=1)
                self.view("features", np.float16)[...] = x.mean(axis=(2, 3)).astype(np.float16)
                self.view("heatmap", np.float32)[...] = x.max(axis=1)
            behaviour.streams.append(int(stream_handle))
            behaviour.last = self
            behaviour.enqueued.set()
            if behaviour.fail_next:
                behaviour.fail_next = False
                return False
            return True

    class Engine:
        num_io_tensors = len(SHAPES)

        def get_tensor_name(self, index: int) -> str:
            return list(SHAPES)[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name == "images" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType.HALF if name == "features" else DataType.FLOAT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return SHAPES[name]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            if name != "images" or profile_index != 0:
                raise RuntimeError(f"no profile shape for {name!r} in profile {profile_index}")
            return [(1, *SAMPLE), (MAX_BATCH, *SAMPLE), (MAX_BATCH, *SAMPLE)]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if bytes(data) == PLAN else None

    module = types.ModuleType("tensorrt")
    for name, value in {
        "__version__": "0.0.0-stand-in",
        "Runtime": Runtime,
        "ILogger": ILogger,
        "TensorIOMode": TensorIOMode,
        "DataType": DataType,
        "nptype": nptype,
    }.items():
        setattr(module, name, value)
    return module, behaviour
