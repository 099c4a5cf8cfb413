"""`make engine TARGET=triton REPO=dir`: a Triton model repository of the model's gated artifact, with the sidecar
the appliance checks the served model against.

    DIR/<name>/config.pbtxt            Triton's model configuration, built as its ModelConfig message
    DIR/<name>/<V>/model.onnx          the artifact (model.plan from a TensorRT plan)
    DIR/<name>/<V>/appliance.json      its sidecar (backend "triton"), appliance.selfcheck.npz beside it
    <engines>/<model>/triton-<name>.json, triton-<name>.selfcheck.npz
                                       the same sidecar where the appliance's triton backend reads it: the server
                                       serves the model, it cannot hand the appliance files

Nothing is built or gated here. The artifact is one `make engine` already gated (the INT8 CPU model of this
host, a TensorRT plan) or the FP32 ONNX itself, the reference, with the manifest's heatmap added as the
onnxruntime backend adds it at load. Its self-check is recorded by running the exported file with ONNX Runtime
here (a plan's is its own): a server that runs it otherwise fails that check when the appliance loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import onnx
from google.protobuf import text_format

from appliance.files.durable import sync_folder, write_atomic
from appliance.inference import registry, self_check
from appliance.inference.artifacts import (
    ArtifactKey,
    Precision,
    SelfCheck,
    Sidecar,
    SidecarError,
    artifact_problem,
    engines_folder,
    read_sidecar,
    sha256_file,
    write_sidecar,
)
from appliance.inference.heatmap_graph import HeatmapError, add_heatmap
from appliance.kserve import triton_config_pb2 as tc
from appliance.toolkit import (
    ApplianceError,
    Backend,
    InferenceConfig,
    LimitsConfig,
    LoadedManifest,
    Preparer,
    expected_sample_shape,
    load_manifest,
)
from build_engine.errors import BuildError
from build_engine.image_sets import load_set
from build_engine.model_check import ModelFacts, check_model

SIDECAR = "appliance.json"  # beside the artifact in the version folder
SELF_CHECK = "appliance.selfcheck.npz"
ENGINES_STEM = "triton-{name}"  # <engines>/<model>/triton-<name>.json and .selfcheck.npz
SELF_CHECK_POOL = 32  # validation images scored to pick the FP32 export's self-check from


@dataclass(frozen=True)
class Platform:
    """How a Triton server serves one kind of artifact."""

    source: str  # the registry backend whose artifact it is
    platform: str
    filename: str
    instance_kind: tc.ModelInstanceGroup.Kind.ValueType


PLATFORMS = {
    "onnxruntime": Platform("onnxruntime", "onnxruntime_onnx", "model.onnx", tc.ModelInstanceGroup.KIND_CPU),
    "tensorrt": Platform("tensorrt", "tensorrt_plan", "model.plan", tc.ModelInstanceGroup.KIND_GPU),
}
SOURCES = tuple(PLATFORMS)

_TRITON_TYPES: dict[int, tc.DataType.ValueType] = {
    onnx.TensorProto.FLOAT: tc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: tc.TYPE_FP16,
}
_MANIFEST_TYPES: dict[str, tc.DataType.ValueType] = {"float32": tc.TYPE_FP32, "float16": tc.TYPE_FP16}
# Triton's model names become folder names on the server; ours also become file names in the engines folder.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class ExportOptions:
    model_dir: Path
    engines_dir: Path
    repo: Path
    precision: str = "auto"
    source: str = "onnxruntime"
    instances: int = 1
    triton_model: str = ""  # '' = the manifest's model name
    triton_version: int = 1
    max_batch: int | None = None  # None = the manifest's batching.max_batch
    max_delay_ms: float = 5.0  # inference.max_delay_ms: Triton's queue delay, as the appliance's batcher waits
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # each backend's settings (threads)


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    folder: Path  # DIR/<name>
    config: Path
    artifact: Path
    sidecar: Path  # in the repository
    engines_sidecar: Path  # in the engines folder
    sidecar_data: Sidecar
    precision: str
    max_batch: int
    heatmap: bool


@dataclass(frozen=True)
class _Source:
    """The artifact to export: a file `make engine` gated, or (path None) the FP32 ONNX with the heatmap added."""

    precision: str
    path: Path | None
    sidecar: Sidecar | None  # its own, where it has one
    why: str


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: tc.DataType.ValueType
    dims: list[int]  # without the batch axis where the model batches


def export(options: ExportOptions, out: Callable[[str], None] = print) -> Exported:
    """Write the repository for `options.model_dir` and the engines-folder copy of its sidecar; BuildError with
    one sentence where it cannot."""
    o = options
    started = time.perf_counter()
    try:
        loaded = load_manifest(o.model_dir)
    except ApplianceError as e:
        raise BuildError(str(e)) from e
    m = loaded.manifest
    name = o.triton_model or m.model.name
    _check_options(o, name)
    platform = PLATFORMS[o.source]
    facts = check_model(loaded, o.max_batch or m.batching.max_batch)
    onnx_sha = sha256_file(loaded.onnx_path)
    folder = engines_folder(o.engines_dir, m.model.name)
    out(f"model     {m.model.name} {m.model.version}: {loaded.onnx_path} (sha256 {onnx_sha[:12]})")
    if o.source == "tensorrt":
        source = _tensorrt_source(o, loaded, folder, onnx_sha)
    else:
        source = _onnxruntime_source(o, loaded, folder, onnx_sha)
    out(f"source    {source.precision}: {source.why}")
    max_batch = _max_batch(o, facts, source)

    o.repo.mkdir(parents=True, exist_ok=True)
    _clean_stale(o.repo, name)
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=o.repo))
    try:
        version = staged / str(o.triton_version)
        artifact = version / platform.filename
        _write_artifact(loaded, source, artifact)
        outputs = _outputs(loaded, facts, artifact)
        heatmap = m.heatmap is not None and any(t.name == m.heatmap.output for t in outputs)
        check = _self_check(o, loaded, source, artifact, max_batch, version / SELF_CHECK)
        config = model_config(
            name=name,
            platform=platform,
            loaded=loaded,
            dynamic=facts.dynamic_batch,
            max_batch=max_batch,
            outputs=outputs,
            delay_us=round(o.max_delay_ms * 1000),
            instances=o.instances,
            version=o.triton_version,
        )
        config_text = text_format.MessageToString(config)
        write_atomic(staged / "config.pbtxt", config_text.encode())
        sidecar = _sidecar(
            o, loaded, source, platform, name, artifact, check, max_batch, config_text, onnx_sha, started
        )
        write_sidecar(version / SIDECAR, sidecar)
        _publish(staged, o.repo / name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

    final = o.repo / name
    stem = ENGINES_STEM.format(name=name)
    engines_check = folder / f"{stem}.selfcheck.npz"
    engines_sidecar = folder / f"{stem}.json"
    # The old sidecar goes first: between the writes there is none, never one naming a self-check it lacks.
    engines_sidecar.unlink(missing_ok=True)
    write_atomic(engines_check, (final / str(o.triton_version) / SELF_CHECK).read_bytes())
    write_sidecar(
        engines_sidecar,
        sidecar.model_copy(update={"self_check": check.model_copy(update={"file": engines_check.name})}),
    )

    exported = Exported(
        folder=final,
        config=final / "config.pbtxt",
        artifact=final / str(o.triton_version) / platform.filename,
        sidecar=final / str(o.triton_version) / SIDECAR,
        engines_sidecar=engines_sidecar,
        sidecar_data=sidecar,
        precision=source.precision,
        max_batch=max_batch,
        heatmap=heatmap,
    )
    _report(exported, o, platform, config, check, out)
    return exported


# --- options and the artifact to export ---------------------------------------------------------------


def _check_options(o: ExportOptions, name: str) -> None:
    if not _MODEL_NAME.fullmatch(name):
        raise BuildError(
            f"{name!r} cannot name a Triton model here: use letters, digits, '_', '.' and '-', not first a '.' "
            "or '-' (--triton-model)."
        )
    if o.source not in PLATFORMS:
        raise BuildError(f"--source {o.source!r} is not exported to Triton; one of {', '.join(SOURCES)}.")
    if o.instances < 1 or o.triton_version < 1:
        raise BuildError("--instances and --triton-version must be at least 1.")
    if o.precision not in ("auto", "int8", "fp16", "fp32"):
        raise BuildError(f"--precision {o.precision!r} is not one of auto, int8, fp16, fp32.")


def _onnxruntime_source(o: ExportOptions, loaded: LoadedManifest, folder: Path, onnx_sha: str) -> _Source:
    """The INT8 CPU model gated on this host where there is one (auto, int8), else the FP32 ONNX (auto, fp32)."""
    if o.precision == "fp16":
        raise BuildError(
            "FP16 is exported only as a TensorRT plan (--source tensorrt): ONNX Runtime on the CPU runs FP32 faster."
        )
    fp32 = "the FP32 ONNX, the reference" + (
        ", with the manifest's heatmap added as the appliance adds it at load" if loaded.manifest.heatmap else ""
    )
    if o.precision == "fp32":
        return _Source("fp32", None, None, fp32)
    kind = registry.reference()
    host = kind.probe(o.inference.settings_of(kind.name))
    choice, passed = kind.choose(folder, onnx_sha, host, loaded.onnx_path)
    if choice is not None and choice.precision == "int8" and choice.path != loaded.onnx_path:
        why = f"{choice.path.name}, the INT8 CPU model that passed the accuracy gate on this {host.cpu_class} CPU"
        return _Source("int8", choice.path, choice.sidecar, why)
    if choice is not None:
        reason = "`make engine` found no INT8 model within the manifest's tolerance on this host"
    else:
        reason = passed.reason
    if o.precision == "int8":
        run = "" if "make engine" in reason else "; run `make engine` first"
        raise BuildError(f"There is no gated INT8 model of {loaded.manifest.model.name} to export: {reason}{run}.")
    return _Source("fp32", None, None, f"{fp32} (no INT8: {reason})")


def _tensorrt_source(o: ExportOptions, loaded: LoadedManifest, folder: Path, onnx_sha: str) -> _Source:
    """The plan built for this host's GPU where it has one, else the one plan in the engines folder built from
    this ONNX (an export on a host without the server's GPU: the plan is copied, not run)."""
    kind = registry.get("tensorrt")
    host = kind.probe(o.inference.settings_of(kind.name))
    if not kind.unavailable_on(host):
        choice, passed = kind.choose(folder, onnx_sha, host, loaded.onnx_path)
        if choice is None or choice.sidecar is None:
            raise BuildError(f"There is no TensorRT plan to export: {passed.reason}.")
        path, sidecar = choice.path, choice.sidecar
    else:
        plans: list[tuple[Path, Sidecar]] = []
        for record in sorted(folder.glob(f"{kind.name}-*.json")):
            try:
                found = read_sidecar(record)
            except SidecarError:
                continue
            plan = folder / found.artifact
            if found.key.onnx_sha256 == onnx_sha and found.artifact and not artifact_problem(plan, found):
                plans.append((plan, found))
        if not plans:
            raise BuildError(
                f"There is no TensorRT plan of {loaded.manifest.model.name} built from this ONNX file in {folder}; "
                "run `make engine TARGET=tensorrt` on a host with the server's GPU and TensorRT version first."
            )
        if len(plans) > 1:
            gpus = ", ".join(f"{s.key.gpu_name} ({p.name})" for p, s in plans)
            raise BuildError(
                f"{folder} holds plans for {gpus}; export on a host with the server's GPU, where its own is chosen."
            )
        path, sidecar = plans[0]
    if o.precision not in ("auto", sidecar.key.precision):
        raise BuildError(
            f"The TensorRT plan {path.name} is {sidecar.key.precision}, not {o.precision}; run `make engine "
            f"TARGET=tensorrt PRECISION={o.precision}` on the server's GPU first, or export with --precision auto."
        )
    if sidecar.self_check is None:
        raise BuildError(f"The TensorRT plan {path.name} has no self-check in its sidecar; run `make engine` again.")
    key = sidecar.key
    why = f"{path.name}, the plan gated on a {key.gpu_name} (compute {key.compute_capability}) with TensorRT " + (
        f"{key.tensorrt_version}: serve it from a Triton with that GPU and TensorRT version"
    )
    return _Source(key.precision, path, sidecar, why)


def _max_batch(o: ExportOptions, facts: ModelFacts, source: _Source) -> int:
    """The model's max batch; a plan's cannot pass the batch its profile was built for."""
    if source.path is None or source.path.suffix != ".plan" or source.sidecar is None:
        return facts.max_batch
    built = source.sidecar.max_batch
    if facts.max_batch <= built:
        return facts.max_batch
    if o.max_batch is not None:
        raise BuildError(f"The plan {source.path.name} was built for batches up to {built}, not {o.max_batch}.")
    return built


def _write_artifact(loaded: LoadedManifest, source: _Source, artifact: Path) -> None:
    if source.path is not None:
        write_atomic(artifact, source.path.read_bytes())
        return
    heatmap = loaded.manifest.heatmap
    if heatmap is None:
        write_atomic(artifact, loaded.onnx_path.read_bytes())
        return
    try:
        model = add_heatmap(
            onnx.load(str(loaded.onnx_path)),
            method=heatmap.method,
            feature=heatmap.feature,
            output_name=heatmap.output,
            copy=False,
        )
    except HeatmapError as e:
        raise BuildError(f"The manifest's [heatmap] cannot be added to {loaded.onnx_path.name}: {e}") from e
    write_atomic(artifact, model.SerializeToString())


def _outputs(loaded: LoadedManifest, facts: ModelFacts, artifact: Path) -> list[_Tensor]:
    """The scores and, where the artifact has it, the heatmap, as the graph declares them.

    A plan holds the heatmap wherever the manifest declares one (`make engine` builds it into every plan, and a
    manifest change rebuilds the plan); its outputs are its ONNX's.
    """
    m = loaded.manifest
    plan = artifact.suffix == ".plan"
    graph = onnx.load(str(loaded.onnx_path if plan else artifact), load_external_data=False).graph
    declared = {o.name: o for o in graph.output}
    scores = declared[m.output.name]
    dims = _shape(scores, facts.output_shape, facts.dynamic_batch)
    if not dims or dims[-1] == -1:  # check_model matched a known width to the labels; an unknown one is theirs
        dims = [*dims[:-1], len(m.output.labels)]
    tensors = [_Tensor(m.output.name, _triton_type(scores, artifact), dims)]
    if m.heatmap is not None and (plan or m.heatmap.output in declared):
        cells = facts.heatmap_shape or [-1, -1, -1]
        value = declared.get(m.heatmap.output)
        dims = (
            _shape(value, cells, facts.dynamic_batch) if value is not None else _batchless(cells, facts.dynamic_batch)
        )
        tensors.append(_Tensor(m.heatmap.output, tc.TYPE_FP32, dims))
    return tensors


def _triton_type(value: onnx.ValueInfoProto, where: Path) -> tc.DataType.ValueType:
    elem = value.type.tensor_type.elem_type
    if elem not in _TRITON_TYPES:
        raise BuildError(f"{where.name}: output {value.name!r} is not float32 or float16, which the appliance reads.")
    return _TRITON_TYPES[elem]


def _shape(value: onnx.ValueInfoProto, fallback: list[int | str], batched: bool) -> list[int]:
    """The declared dims (symbolic ones -1), or the checked model's where the graph declares no shape."""
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return _batchless(fallback, batched)
    return _batchless([d.dim_value if d.HasField("dim_value") else -1 for d in dims], batched)


def _batchless(dims: list[int | str] | list[int], batched: bool) -> list[int]:
    """Triton's dims: the batch axis is max_batch_size's where the model batches; unknown dims are -1."""
    shown = [d if isinstance(d, int) and d > 0 else -1 for d in dims]
    return shown[1:] if batched else [1, *shown[1:]]


# --- the configuration ------------------------------------------------------------------------------


def model_config(
    *,
    name: str,
    platform: Platform,
    loaded: LoadedManifest,
    dynamic: bool,
    max_batch: int,
    outputs: list[_Tensor],
    delay_us: int,
    instances: int,
    version: int,
) -> tc.ModelConfig:
    """Triton's ModelConfig for the model: the manifest's input and the artifact's outputs, batched by Triton
    up to `max_batch` within the appliance's own batching delay.

    A model whose batch axis is fixed at 1 cannot be batched by Triton: max_batch_size 0, and its dims hold the
    batch axis (Triton's rule for a model that does not batch).
    """
    m = loaded.manifest
    spec = m.input
    sample = list(expected_sample_shape(loaded))  # C x H x W or H x W x C, as the manifest's layout says
    config = tc.ModelConfig(
        name=name,
        platform=platform.platform,
        max_batch_size=max_batch if dynamic else 0,
        default_model_filename=platform.filename,
    )
    config.version_policy.specific.versions.append(version)
    image = config.input.add(name=spec.name, data_type=_MANIFEST_TYPES[spec.dtype], dims=sample)
    if dynamic:
        image.format = tc.ModelInput.FORMAT_NCHW if spec.layout == "NCHW" else tc.ModelInput.FORMAT_NHWC
    else:
        image.dims.insert(0, 1)  # Triton refuses a format on any but 3 dims: with the batch axis it has none
    for tensor in outputs:
        config.output.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    if dynamic:
        # No preferred sizes: Triton then sends the largest batch ready within the delay, as the appliance does.
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.instance_group.add(count=instances, kind=platform.instance_kind)
    return config


# --- the self-check and the sidecar -------------------------------------------------------------------


def _self_check(
    o: ExportOptions, loaded: LoadedManifest, source: _Source, artifact: Path, max_batch: int, path: Path
) -> SelfCheck:
    """The exported artifact's self-check: a plan's own (it cannot run here); else its source's inputs, or for
    the FP32 ONNX validation images, run through the exported file with ONNX Runtime here.

    The source's recorded scores are checked first: an INT8 model that no longer reproduces them on this host
    is not exported (the appliance would refuse it here too)."""
    if source.path is not None and source.path.suffix == ".plan":
        assert source.sidecar is not None and source.sidecar.self_check is not None  # _tensorrt_source checked
        recorded = source.path.parent / source.sidecar.self_check.file
        if not recorded.is_file() or sha256_file(recorded) != source.sidecar.self_check.sha256:
            raise BuildError(
                f"The self-check file of {source.path.name} is missing or altered; run `make engine` to rebuild it."
            )
        write_atomic(path, recorded.read_bytes())
        return source.sidecar.self_check.model_copy(update={"file": path.name})
    m = loaded.manifest
    kind = registry.reference()
    backend = kind.open(
        artifact,
        output_name=m.output.name,
        max_batch=max_batch,
        settings=o.inference.settings_of(kind.name),
        heatmap=m.heatmap,
    )
    try:
        backend.load()
    except ApplianceError as e:
        raise BuildError(f"The exported {artifact.name} does not load in ONNX Runtime: {e}") from e
    with backend:
        recorded_check = source.sidecar.self_check if source.sidecar is not None else None
        if recorded_check is not None and source.path is not None:
            problem = self_check.verify(backend, source.path.parent, recorded_check, m.output.activation)
            if problem:
                raise BuildError(f"{problem}; it is not exported.")
            with np.load(source.path.parent / recorded_check.file, allow_pickle=False) as data:
                inputs = list(data["inputs"])
            return self_check.record(backend, inputs, m.output.activation, path, recorded_check.tolerance)
        return self_check.record(backend, _least_saturated(o, loaded, backend), m.output.activation, path)


def _least_saturated(o: ExportOptions, loaded: LoadedManifest, backend: Backend) -> list[np.ndarray]:
    """The FP32 model has no gate record to take its self-check from: validation images where its scores are
    furthest from 0 and 1, where the output is steepest and another kernel path shows first."""
    m = loaded.manifest
    images_dir = loaded.folder / m.calibration.validation
    if not images_dir.exists():
        images_dir = loaded.folder / m.calibration.images
    images = load_set(images_dir, Preparer(m, o.limits), what="validation", limit=SELF_CHECK_POOL)
    if not images.tensors:
        raise BuildError(f"No usable validation images in {images_dir} to record the self-check with.")
    scores = self_check.scores_of(backend, np.stack(images.tensors), m.output.activation)
    distance = np.abs(scores.astype(np.float64) - 0.5).min(axis=1)
    picked = sorted(int(i) for i in np.argsort(distance, kind="stable")[: self_check.COUNT])
    return [images.tensors[i] for i in picked]


def _sidecar(
    o: ExportOptions,
    loaded: LoadedManifest,
    source: _Source,
    platform: Platform,
    name: str,
    artifact: Path,
    check: SelfCheck,
    max_batch: int,
    config_text: str,
    onnx_sha: str,
    started: float,
) -> Sidecar:
    m = loaded.manifest
    own = source.sidecar
    artifact_sha = sha256_file(artifact)
    inputs = {"artifact": artifact_sha, "config": config_text, "source": own.inputs_sha256 if own else ""}
    notes = []
    if source.precision == "int8" and own is not None and platform.source == "onnxruntime":
        notes.append(
            f"INT8 was gated on this host's CPU ({own.key.cpu_class}, ONNX Runtime {own.key.onnxruntime_version}); "
            "a server whose CPU or runtime runs it otherwise fails its self-check at the appliance's load (export "
            "--precision fp32 for such a server)"
        )
    return Sidecar(
        model=m.model.name,
        model_version=m.model.version,
        key=ArtifactKey(
            backend="triton",
            precision=cast(Precision, source.precision),
            onnx_sha256=onnx_sha,
            calibration_sha256=own.key.calibration_sha256 if own else "",
        ),
        artifact=artifact.name,
        artifact_sha256=artifact_sha,
        inputs_sha256=hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(),
        max_batch=max_batch,
        opt_batch=own.opt_batch if own else 0,
        excluded_nodes=own.excluded_nodes if own else [],
        recipe={
            "source": platform.source,
            "triton_model": name,
            "triton_version": o.triton_version,
            "platform": platform.platform,
            "source_artifact": source.path.name if source.path is not None else loaded.onnx_path.name,
        },
        self_check=check,
        built_unix=time.time(),
        build_seconds=round(time.perf_counter() - started, 2),
        gate=own.gate if own else {},
        notes=notes,
    )


# --- putting it in place -------------------------------------------------------------------------------


def _clean_stale(repo: Path, name: str) -> None:
    """What a killed export left in the repository: never a model Triton would load under the name."""
    for stale in (*repo.glob(f".{name}.tmp-*"), *repo.glob(f".{name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(staged: Path, final: Path) -> None:
    """The staged model folder in place of `final`, whole: a server reading the repository finds the old model or
    the new one, never a mix (between the two renames, for an instant, none)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(staged, final)
    sync_folder(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _report(
    e: Exported,
    o: ExportOptions,
    platform: Platform,
    config: tc.ModelConfig,
    check: SelfCheck,
    out: Callable[[str], None],
) -> None:
    batching = (
        f"max batch {e.max_batch}, dynamic batching within {config.dynamic_batching.max_queue_delay_microseconds} us"
        if config.max_batch_size
        else "no batching (the model's batch axis is fixed at 1)"
    )
    kind = tc.ModelInstanceGroup.Kind.Name(platform.instance_kind).removeprefix("KIND_")
    out(f"wrote     {e.config} ({platform.platform}, {batching}, {o.instances} {kind} instance"
        f"{'s' if o.instances != 1 else ''})")  # fmt: skip
    out(f"wrote     {e.artifact} ({e.precision}, heatmap {'yes' if e.heatmap else 'no'})")
    out(f"wrote     {e.sidecar} and {SELF_CHECK} (self-check: {check.count} images, tolerance {check.tolerance})")
    out(f"wrote     {e.engines_sidecar} and its self-check: what the appliance checks the served model against")
    for note in e.sidecar_data.notes:
        out(f"note      {note}")
    out(
        f"next      copy {e.folder} into the Triton server's model repository and set inference.backend = "
        f'"triton" (model "{e.folder.name}", version {o.triton_version})'
    )
