"""The cuda-python layer under the TensorRT backend: on a real GPU where there is one (skipped with the
reason elsewhere), and its diagnosis of a missing or mismatched cuda-python everywhere."""

from __future__ import annotations

import enum
import re
import sys
import types

import numpy as np
import pytest

from appliance.inference.backends import cuda

GPU_PROBLEM = cuda.gpu_problem()


class TestWithoutAGpu:
    def test_a_missing_cuda_python_is_named_with_the_extra_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # what Python does when it is not installed
        problem = cuda.gpu_problem()
        assert problem.startswith("cuda-python is not installed")
        assert "pip install '.[gpu-cu13]'" in problem and "'.[gpu-cu12]'" in problem
        assert cuda.gpu_count() == 0

    def test_a_driver_too_old_for_this_cuda_python_is_named_not_hidden(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """cuda-python 13 on a CUDA 12.8 driver: the runtime's own error, by name, and the extra that fits."""
        _stand_in_runtime(monkeypatch, error="cudaErrorInsufficientDriver", driver=12080)
        problem = cuda.gpu_problem()
        assert problem.startswith("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        assert "cuda-python 13.4.4" in problem and "CUDA 12.8" in problem
        assert problem.endswith("pip install '.[gpu-cu12]'.")
        assert cuda.gpu_count() == 0  # kept as it was: the count alone says nothing of why

    def test_no_device_says_no_gpu_is_visible(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _stand_in_runtime(monkeypatch, error="cudaErrorNoDevice", driver=13000)
        assert cuda.gpu_problem() == "no CUDA GPU is visible (cudaErrorNoDevice: no CUDA-capable device is detected)."

    def test_a_usable_gpu_is_no_problem(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _stand_in_runtime(monkeypatch, error="cudaSuccess", driver=13000)
        assert cuda.gpu_problem() == ""
        assert cuda.gpu_count() == 1


def _stand_in_runtime(monkeypatch: pytest.MonkeyPatch, *, error: str, driver: int) -> None:
    """The few `cuda.bindings.runtime` calls gpu_problem() makes, answering as a real runtime does."""

    class cudaError_t(enum.IntEnum):  # cuda-python's name
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    texts = {
        "cudaErrorInsufficientDriver": "CUDA driver version is insufficient for CUDA runtime version",
        "cudaErrorNoDevice": "no CUDA-capable device is detected",
        "cudaSuccess": "no error",
    }
    code = cudaError_t[error]
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaError_t = cudaError_t  # type: ignore[attr-defined]
    runtime.cudaGetDeviceCount = lambda: (code, 1 if code == 0 else 0)  # type: ignore[attr-defined]
    runtime.cudaDriverGetVersion = lambda: (cudaError_t.cudaSuccess, driver)  # type: ignore[attr-defined]
    runtime.cudaGetErrorName = lambda e: (cudaError_t.cudaSuccess, e.name.encode())  # type: ignore[attr-defined]
    runtime.cudaGetErrorString = lambda e: (cudaError_t.cudaSuccess, texts[e.name].encode())  # type: ignore[attr-defined]
    bindings = types.ModuleType("cuda.bindings")
    bindings.__version__ = "13.4.4"  # type: ignore[attr-defined]
    bindings.runtime = runtime  # type: ignore[attr-defined]
    package = types.ModuleType("cuda")
    package.bindings = bindings  # type: ignore[attr-defined]
    package.__path__ = []  # a package, so `import cuda.bindings` looks in sys.modules
    for name, module in (("cuda", package), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_PROBLEM), reason=GPU_PROBLEM or "a GPU is usable")
class TestOnAGpu:
    def test_gpu_info_names_the_gpu_its_compute_capability_and_sms(self) -> None:
        info = cuda.gpu_info(0)
        assert info.name and "\x00" not in info.name
        assert re.fullmatch(r"\d+\.\d+", info.compute_capability)
        assert info.sm_count > 0
        assert info.total_memory_bytes > 2**30

    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_pinned_and_device_buffers_round_trip_through_a_stream(self, dtype: type) -> None:
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

    def test_a_failing_cuda_call_becomes_a_clear_error(self) -> None:
        with pytest.raises(cuda.CudaError, match=r"CUDA error cudaErrorInvalidDevice: .*ordinal"):
            cuda.check(cuda.runtime().cudaSetDevice(10_000))
        cuda.check(cuda.runtime().cudaSetDevice(0))  # not sticky: the device still works

    def test_an_impossible_allocation_is_an_error_not_a_crash(self) -> None:
        with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
            cuda.DeviceBuffer(1 << 50)  # a petabyte
