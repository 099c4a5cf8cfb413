"""Every available backend runs the same tiny real ONNX model and honours the interface's checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance.config import InferenceConfig
from appliance.domain.errors import BackendError, ModelMismatchError
from appliance.domain.manifest import load_manifest
from appliance.inference import registry
from appliance.inference.backend import Backend, BackendKind
from appliance.inference.backends import onnxruntime
from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend
from appliance.inference.loader import open_backend
from appliance.inference.selection import Host

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _onnxruntime() -> Backend:
    return OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=16, threads=1)


ORT_PROBLEM = onnxruntime.is_available()
BACKENDS = [
    pytest.param(
        _onnxruntime,
        id="onnxruntime",
        marks=pytest.mark.skipif(ORT_PROBLEM is not None, reason=ORT_PROBLEM or "ONNX Runtime is available"),
    )
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


@pytest.mark.parametrize("kind", registry.kinds(), ids=lambda kind: kind.name)
def test_each_backend_says_whether_it_can_run_here_in_a_sentence(kind: BackendKind) -> None:
    problem = kind.is_available()
    assert problem is None or (problem[:1].isupper() and problem.endswith(".") and "\n" not in problem), problem


def test_the_registry_names_each_backend_once_and_the_reference_serves_fp32() -> None:
    names = registry.names()
    assert set(names) >= {"onnxruntime", "tensorrt"} and len(set(names)) == len(names)
    assert registry.AUTO not in names
    assert registry.reference().name == "onnxruntime"
    assert [kind.tier for kind in registry.by_tier()] == sorted(kind.tier for kind in registry.kinds())


def test_the_host_holds_each_backend_s_own_facts_by_its_name() -> None:
    host = Host.probe()
    assert set(host.facts) == set(registry.names())
    for kind in registry.kinds():
        problem = kind.unavailable_on(host.of(kind))
        assert problem == "" or (problem[:1].isalpha() and not problem.endswith(".")), problem
        assert kind.stem(host.of(kind)).startswith(kind.name)


def test_the_fp32_model_gets_its_heatmap_at_load_in_the_same_call() -> None:
    """The manifest's heatmap is added to the FP32 ONNX as it loads: one call returns both, the scores as before."""
    spec = load_manifest(MODEL).manifest.heatmap
    assert spec is not None
    batch = np.random.default_rng(3).standard_normal((5, 1, 64, 64)).astype(np.float32)
    with _onnxruntime() as plain:
        assert not plain.has_heatmap
        assert plain.run(batch).heatmap is None
        scores = plain.infer(batch)
    with OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=16, threads=1, heatmap=spec) as b:
        assert b.has_heatmap
        out = b.run(batch)
    assert np.array_equal(out.scores, scores)  # the model's own nodes run as before
    assert out.heatmap is not None and out.heatmap.shape == (5, 8, 8) and out.heatmap.dtype == np.float32
    assert np.all(out.heatmap >= 0.0) and np.all(out.heatmap <= 1.0)
    assert np.allclose(out.heatmap.max(axis=(1, 2)), 1.0, atol=1e-6)  # normalised per image


def test_a_heatmap_the_model_cannot_have_refuses_the_load_with_the_reason() -> None:
    spec = load_manifest(MODEL).manifest.heatmap
    assert spec is not None
    wrong = spec.model_copy(update={"feature": "no_such_tensor"})
    backend = OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=4, threads=1, heatmap=wrong)
    with pytest.raises(ModelMismatchError, match="no_such_tensor"):
        backend.load()


def test_the_loader_asks_for_the_heatmap_unless_the_config_turns_it_off(tmp_path: Path) -> None:
    loaded = load_manifest(MODEL)
    with open_backend(loaded, InferenceConfig(threads=1), tmp_path) as on:
        assert on.has_heatmap
    with open_backend(loaded, InferenceConfig(threads=1, heatmaps=False), tmp_path) as off:
        assert not off.has_heatmap


def test_an_artifact_with_a_heatmap_served_without_one_does_not_compute_it(tmp_path: Path) -> None:
    """ONNX Runtime runs every node whatever a call asks for: with heatmaps off, the branch is cut at load."""
    import onnx

    from appliance.inference.heatmap_graph import add_heatmap

    spec = load_manifest(MODEL).manifest.heatmap
    assert spec is not None
    built = add_heatmap(onnx.load(str(MODEL / "model.onnx")), method=spec.method, feature=spec.feature)
    artifact = tmp_path / "with-heatmap.onnx"
    onnx.save(built, str(artifact))
    cut = onnxruntime._only_output(onnx.load(str(artifact)), "logit")
    assert [o.name for o in cut.graph.output] == ["logit"]
    assert not [n.name for n in cut.graph.node if n.name.startswith("heatmap/")]
    assert len(cut.graph.node) == len(onnx.load(str(MODEL / "model.onnx")).graph.node)
    batch = np.random.default_rng(5).standard_normal((3, 1, 64, 64)).astype(np.float32)
    with OnnxRuntimeBackend(artifact, output_name="logit", max_batch=4, threads=1) as off, _onnxruntime() as plain:
        assert not off.has_heatmap and off.run(batch).heatmap is None
        assert np.array_equal(off.infer(batch), plain.infer(batch))


def test_a_heatmap_stride_that_does_not_fit_the_grid_refuses_the_load(tmp_path: Path) -> None:
    loaded = load_manifest(MODEL)
    spec = loaded.manifest.heatmap
    assert spec is not None
    wrong = loaded.manifest.model_copy(update={"heatmap": spec.model_copy(update={"stride": 7})})
    with pytest.raises(ModelMismatchError, match=r"heatmap\.stride 7 puts the heatmap's 8 cells over 56"):
        open_backend(type(loaded)(manifest=wrong, folder=loaded.folder), InferenceConfig(threads=1), tmp_path)
