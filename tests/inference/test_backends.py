"""Every available backend runs the same tiny real ONNX model and honours the interface's checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance.config import InferenceConfig
from appliance.errors import BackendError, ModelMismatchError
from appliance.inference.backend import Backend
from appliance.inference.loader import open_backend
from appliance.inference.onnxruntime import OnnxRuntimeBackend
from appliance.inference.onnxruntime import is_available as ort_available
from appliance.manifest import load_manifest

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _onnxruntime() -> Backend:
    return OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=16, threads=1)


BACKENDS = [
    pytest.param(_onnxruntime, id="onnxruntime", marks=pytest.mark.skipif(not ort_available(), reason="no ORT"))
]


@pytest.mark.parametrize("make", BACKENDS)
def test_backend_runs_the_model(make: Callable[[], Backend]) -> None:
    with make() as backend:
        spec = backend.input_spec
        assert spec.name == "image" and spec.shape[1:] == (1, 64, 64) and spec.dtype == np.float32
        assert backend.max_batch == 16
        rng = np.random.default_rng(0)
        batch = rng.random((5, 1, 64, 64), dtype=np.float32)
        out = backend.infer(batch)
        assert out.shape == (5, 1)
        # Batching does not change a sample's score.
        assert np.allclose(backend.infer(batch[2:3])[0], out[2], atol=1e-5)
        with pytest.raises(BackendError, match=r"outside 1\.\.16"):
            backend.infer(rng.random((17, 1, 64, 64), dtype=np.float32))
        with pytest.raises(BackendError, match="dtype"):
            backend.infer(batch.astype(np.float64))
    with pytest.raises(BackendError, match="not loaded"):
        backend.infer(batch)


def test_loader_refuses_a_manifest_naming_another_output(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes((MODEL / "model.onnx").read_bytes())
    text = (MODEL / "model.toml").read_text().replace('name = "logit"', 'name = "probabilities"')
    (tmp_path / "model.toml").write_text(text)
    with pytest.raises(ModelMismatchError, match="no output named 'probabilities'"):
        open_backend(load_manifest(tmp_path), InferenceConfig(), tmp_path / "engines")
