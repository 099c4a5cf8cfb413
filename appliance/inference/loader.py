"""Opens the configured backend for a model and checks the graph against its manifest before serving."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from appliance.config import InferenceConfig
from appliance.errors import ModelMismatchError
from appliance.inference.backend import Backend
from appliance.inference.onnxruntime import OnnxRuntimeBackend
from appliance.inference.selection import choose_artifact
from appliance.inference.tensorrt import TensorRtBackend
from appliance.manifest import LoadedManifest

log = logging.getLogger(__name__)


def expected_sample_shape(loaded: LoadedManifest) -> tuple[int, int, int]:
    spec = loaded.manifest.input
    if spec.layout == "NCHW":
        return (spec.channels, spec.height, spec.width)
    return (spec.height, spec.width, spec.channels)


def open_backend(loaded: LoadedManifest, config: InferenceConfig, engines_dir: Path) -> Backend:
    """Load the best artifact for this host and refuse one whose input/output do not match the manifest."""
    manifest = loaded.manifest
    max_batch = min(config.max_batch or manifest.batching.max_batch, manifest.batching.max_batch)
    choice = choose_artifact(loaded, config, engines_dir)
    best = choice.sidecar.throughput.get("best_batch") if choice.sidecar else None
    if isinstance(best, int) and 1 <= best < max_batch:
        # `make engine` measured this host: larger batches are no faster here, only slower to fill.
        log.info("batching up to %d, the fastest batch `make engine` measured on this host", best)
        max_batch = best
    # A passed-over artifact that `make engine` would fix is worth a warning in the journal.
    level = logging.WARNING if "run `make engine`" in choice.reason else logging.INFO
    log.log(level, "serving %s %s (%s): %s", choice.backend, choice.precision, choice.path.name, choice.reason)
    backend: Backend
    if choice.backend == "tensorrt":
        backend = TensorRtBackend(choice.path, output_name=manifest.output.name, max_batch=max_batch)
    else:
        backend = OnnxRuntimeBackend(
            choice.path, output_name=manifest.output.name, max_batch=max_batch, threads=config.threads
        )
    backend.load()
    try:
        check_backend_matches(backend, loaded)
    except ModelMismatchError:
        backend.close()
        raise
    log.info(
        "loaded model %s %s on %s from %s (max batch %d)",
        manifest.model.name,
        manifest.model.version,
        backend.name,
        backend.artifact,
        backend.max_batch,
    )
    return backend


def check_backend_matches(backend: Backend, loaded: LoadedManifest) -> None:
    manifest = loaded.manifest
    spec = backend.input_spec
    where = backend.artifact
    if spec.name != manifest.input.name:
        raise ModelMismatchError(
            f"{where}: the model's input is {spec.name!r} but model.toml says {manifest.input.name!r}."
        )
    want = expected_sample_shape(loaded)
    got = spec.shape[1:]
    if len(got) != 3 or any(g is not None and g != w for g, w in zip(got, want, strict=True)):
        raise ModelMismatchError(
            f"{where}: the model's input shape is {list(spec.shape)} but model.toml "
            f"({manifest.input.layout}) implies [N, {', '.join(map(str, want))}]."
        )
    if spec.dtype != np.dtype(manifest.input.dtype):
        raise ModelMismatchError(
            f"{where}: the model's input is {spec.dtype} but model.toml says {manifest.input.dtype}."
        )
    probe = np.zeros((1, *want), dtype=spec.dtype)
    width = backend.infer(probe).shape[1]  # also warms the session up before we report ready
    if width != len(manifest.output.labels):
        raise ModelMismatchError(
            f"{where}: the model outputs {width} scores but model.toml names {len(manifest.output.labels)} labels."
        )
