"""Opens the best artifact for a model, checks its graph against the manifest and self-checks it before serving."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from appliance.domain.errors import ArtifactRefused, BackendError, BackendUnavailable, ManifestError, ModelMismatchError
from appliance.domain.faults import Faults
from appliance.domain.manifest import Heatmap as HeatmapSpec
from appliance.domain.manifest import LoadedManifest, Manifest
from appliance.inference import registry, self_check
from appliance.inference.backend import Backend, Choice, Why
from appliance.inference.failover import Failover
from appliance.inference.selection import Selection, choose_artifact
from appliance.inference.settings import InferenceConfig

log = logging.getLogger(__name__)


def expected_sample_shape(loaded: LoadedManifest) -> tuple[int, int, int]:
    spec = loaded.manifest.input
    if spec.layout == "NCHW":
        return (spec.channels, spec.height, spec.width)
    return (spec.height, spec.width, spec.channels)


@dataclass(frozen=True)
class Served:
    """A model opened for serving: its manifest, the backend it runs on, and why that artifact (what `GetStatus`
    and the log report)."""

    loaded: LoadedManifest
    backend: Backend
    precision: str
    reason: str
    passed_over: list[str] = field(default_factory=list)
    refused: int = 0  # built artifacts not served: another host's key, damaged, or failed to load or self-check
    # Why each better artifact this host could run is missing (none built, built for another host or ONNX file,
    # damaged): what a build here would make; empty when the best this host can run is served.
    unbuilt: tuple[str, ...] = ()

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest


# What a build on this host mends; a missing runtime or GPU (Why.NO_RUNTIME) no build here can.
BUILDABLE = frozenset({Why.NONE_BUILT, Why.OTHER_HOST, Why.STALE, Why.DAMAGED})


def open_backend(loaded: LoadedManifest, config: InferenceConfig, engines_dir: Path) -> Backend:
    """The best artifact for this host, loaded, matched against the manifest and self-checked."""
    return open_served(loaded, config, engines_dir).backend


def open_served(
    loaded: LoadedManifest, config: InferenceConfig, engines_dir: Path, faults: Faults | None = None
) -> Served:
    """Try the selection's chain in order; an artifact that fails to load or its self-check is passed over
    for the next, with the reason logged. The last in the chain (FP32, or the plan that `backend =
    "tensorrt"` demands) refuses to start instead. A remote backend is served with the rest of the chain behind
    it (``faults`` hears when that serves instead)."""
    return _serve_first(loaded, config, choose_artifact(loaded, config, engines_dir), faults)


def _serve_first(
    loaded: LoadedManifest, config: InferenceConfig, selection: Selection, faults: Faults | None
) -> Served:
    failed: list[str] = []
    for number, choice in enumerate(selection.chain, start=1):
        if registry.get(choice.backend).remote:
            behind = Selection(selection.chain[number:], selection.passed_over)
            return _serve_remote(loaded, config, choice, _serve_first(loaded, config, behind, faults), faults)
        try:
            backend = _load_checked(loaded, config, choice)
        except (BackendError, ManifestError) as e:
            if number == len(selection.chain):
                raise
            log.warning("passed over %s %s (%s): %s", choice.backend, choice.precision, choice.path.name, e)
            failed.append(str(e).rstrip("."))
            continue
        # Only what ranks above the served artifact is worth a warning (and the metric): a CPU model of
        # another class beside a good TensorRT plan is no loss.
        refused = failed[:]
        for p in selection.passed_over:
            worse = p.tier >= choice.tier or p.why in (Why.NO_RUNTIME, Why.NONE_BUILT)
            log.log(logging.INFO if worse else logging.WARNING, "passed over: %s", p.reason)
            if not worse:
                refused.append(p.reason)
        reason = choice.reason
        if failed:
            reason = f"{reason}; what ranks above it failed at load: {'; '.join(failed)}"
        log.info("serving %s %s (%s): %s", choice.backend, choice.precision, choice.path.name, reason)
        manifest = loaded.manifest
        log.info(
            "loaded model %s %s on %s from %s (max batch %d)",
            manifest.model.name,
            manifest.model.version,
            backend.name,
            backend.artifact,
            backend.max_batch,
        )
        passed = [p.reason for p in selection.passed_over] + failed
        unbuilt = tuple(p.reason for p in selection.passed_over if p.why in BUILDABLE and p.tier < choice.tier)
        return Served(loaded, backend, choice.precision, reason, passed, len(refused), unbuilt)
    raise BackendUnavailable("No artifact to serve.")  # unreachable: the chain always ends in a model


def _serve_remote(
    loaded: LoadedManifest, config: InferenceConfig, choice: Choice, local: Served, faults: Faults | None
) -> Served:
    """The servers, each checked as it joins (metadata against the local artifact's input, then the export's
    self-check), with ``local`` behind them; ``local`` alone where every server answers with another model."""
    manifest = loaded.manifest
    remote = make_backend(choice.backend, choice.path, manifest.output.name, local.backend.max_batch, config,
                          manifest.heatmap if config.heatmaps else None)  # fmt: skip
    settings = config.settings_of(choice.backend)
    backend = Failover(remote, local.backend, failures=getattr(settings, "failures_before_fallback", 3), faults=faults)
    check = choice.sidecar.self_check if choice.sidecar else None
    folder, activation = choice.path.parent, manifest.output.activation
    backend.adopt_check(lambda b: self_check.verify(b, folder, check, activation))
    try:
        backend.load()
        check_backend_matches(backend, loaded)
    except Exception as e:  # whatever the servers did, this host's own artifact serves
        backend.close_remote()
        e = e if isinstance(e, (BackendError, ManifestError)) else BackendError(f"{type(e).__name__} at load.")
        log.warning("passed over %s (%s): %s", choice.backend, choice.path.name, e)
        reason = f"{local.reason}; the inference servers were refused: {str(e).rstrip('.')}"
        return replace(local, reason=reason, passed_over=[*local.passed_over, str(e).rstrip(".")])
    log.info("serving %s %s (%s): %s; behind it %s", choice.backend, choice.precision, choice.path.name,
             choice.reason, local.backend.name)  # fmt: skip
    reason = f"{choice.reason}; {local.backend.name} {local.precision} serves while no server answers"
    return Served(loaded, backend, choice.precision, reason, local.passed_over, local.refused)


def _load_checked(loaded: LoadedManifest, config: InferenceConfig, choice: Choice) -> Backend:
    manifest = loaded.manifest
    max_batch = min(config.max_batch or manifest.batching.max_batch, manifest.batching.max_batch)
    best = choice.sidecar.throughput.get("best_batch") if choice.sidecar else None
    if isinstance(best, int) and 1 <= best < max_batch:
        # `make engine` measured this host: larger batches are no faster here, only slower to fill.
        log.info("batching up to %d, the fastest batch `make engine` measured on this host", best)
        max_batch = best
    heatmap = manifest.heatmap if config.heatmaps else None
    backend = make_backend(choice.backend, choice.path, manifest.output.name, max_batch, config, heatmap)
    try:
        backend.load()
        check_backend_matches(backend, loaded)
        if choice.sidecar is not None and choice.sidecar.artifact:
            check = choice.sidecar.self_check
            problem = self_check.verify(backend, choice.path.parent, check, manifest.output.activation)
            if problem or check is None:
                raise ArtifactRefused(problem + ".")
            log.info("%s passed its self-check on %d of its gate's images", choice.path.name, check.count)
    except BaseException:
        backend.close()
        raise
    return backend


def make_backend(
    name: str,
    path: Path,
    output_name: str,
    max_batch: int,
    config: InferenceConfig,
    heatmap: HeatmapSpec | None = None,
) -> Backend:
    """The registry's backend `name` on `path`, with its settings from the config; not yet loaded."""
    kind = registry.get(name)
    settings = config.settings_of(name)
    return kind.open(path, output_name=output_name, max_batch=max_batch, settings=settings, heatmap=heatmap)


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
    out = backend.run(probe)  # also warms the session up before we report ready
    width = out.scores.shape[1]
    if manifest.heatmap is not None and out.heatmap is not None:
        # Where each cell lies on the input: every result's heatmap is placed on its image by it.
        try:
            manifest.heatmap.cell((manifest.input.height, manifest.input.width), out.heatmap.shape[1:3])
        except ValueError as e:
            raise ModelMismatchError(f"{where}: {e}.") from e
    if width != len(manifest.output.labels):
        raise ModelMismatchError(
            f"{where}: the model outputs {width} scores but model.toml names {len(manifest.output.labels)} labels."
        )
