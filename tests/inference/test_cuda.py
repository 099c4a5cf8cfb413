"""The cuda-python layer under the TensorRT backend, on a real GPU (skipped without cuda-python or a GPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from appliance.inference import cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda.gpu_count() == 0, reason="needs cuda-python and an NVIDIA GPU"),
]


def test_gpu_info_names_the_gpu_and_its_compute_capability() -> None:
    info = cuda.gpu_info(0)
    assert info.name and "\x00" not in info.name
    assert re.fullmatch(r"\d+\.\d+", info.compute_capability)
    assert info.total_memory_bytes > 2**30


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pinned_and_device_buffers_round_trip_through_a_stream(dtype: type) -> None:
    count = 3 * 240 * 240 * 8  # a VGG batch of 8
    src, dst = cuda.PinnedBuffer(count, np.dtype(dtype)), cuda.PinnedBuffer(count, np.dtype(dtype))
    device, stream = cuda.DeviceBuffer(src.nbytes), cuda.Stream()
    try:
        src.array[:] = np.random.default_rng(0).standard_normal(count).astype(dtype)
        dst.array[:] = 0
        cuda.copy_to_device(device, src, src.nbytes, stream)
        cuda.copy_to_host(dst, device, src.nbytes, stream)
        stream.synchronize()
        assert np.array_equal(dst.array, src.array)
    finally:
        for part in (src, dst, device, stream):
            part.close()
    for part in (src, dst, device, stream):
        part.close()  # a second close is a no-op, never a double free
    assert src.pointer is None and device.pointer is None and stream.handle is None


def test_a_failing_cuda_call_becomes_a_clear_error() -> None:
    with pytest.raises(cuda.CudaError, match=r"CUDA error cudaErrorInvalidDevice: .*ordinal"):
        cuda.check(cuda.runtime().cudaSetDevice(10_000))
    cuda.check(cuda.runtime().cudaSetDevice(0))  # not sticky: the device still works


def test_an_impossible_allocation_is_an_error_not_a_crash() -> None:
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(1 << 50)  # a petabyte
