"""The build: validate, calibrate, quantize, gate, fall back, write artifact + sidecar, measure, report.

Precision chains, tried in order until one passes the gate:
  onnxruntime (CPU): int8 -> fp32 (the FP32 ONNX served as is; FP16 is slower than FP32 on x86 CPUs)
  tensorrt (GPU):    int8 -> fp16 -> fp32
An explicit precision is tried alone; outside the tolerance the build fails with the figures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.config import LimitsConfig
from appliance.errors import ApplianceError
from appliance.inference import cuda
from appliance.inference.artifacts import (
    ORT_RECORD,
    TIMING_CACHE,
    ArtifactKey,
    Sidecar,
    SidecarError,
    engines_folder,
    read_sidecar,
    sha256_file,
    tensorrt_stem,
    write_atomic,
    write_sidecar,
)
from appliance.inference.backend import Backend
from appliance.inference.loader import expected_sample_shape
from appliance.inference.onnxruntime import OnnxRuntimeBackend
from appliance.inference.runs import images_per_second, scores_in_batches
from appliance.inference.selection import Host
from appliance.inference.tensorrt import TensorRtBackend, tensorrt_version
from appliance.manifest import Accuracy, LoadedManifest, load_manifest
from appliance.pipeline import Preparer
from build_engine.errors import BuildError, GateFailed
from build_engine.gate import GateReport, compare
from build_engine.image_sets import ImageSet, load_set
from build_engine.model_check import ModelFacts, check_model
from build_engine.quantize import (
    TensorReader,
    classifier_head,
    last_convolutions,
    prepare_float_model,
    quantize,
    rank_sensitive_nodes,
    to_fp16,
    weighted_nodes,
)
from build_engine.tensorrt_build import build_plan

Target = Literal["onnxruntime", "tensorrt"]
CHAINS: dict[Target, list[str]] = {"onnxruntime": ["int8", "fp32"], "tensorrt": ["int8", "fp16", "fp32"]}
EXCLUSION_STEPS = (3, 8)  # how many of the most sensitive layers to keep in float, after the head
LAST_CONVOLUTIONS = 2  # kept in float with the head, before the sensitivity ranking is consulted
BUILD_RECIPE = 2  # bump when the build changes in a way that should invalidate reused artifacts


@dataclass
class BuildOptions:
    model_dir: Path
    engines_dir: Path
    calibration_dir: Path | None = None
    validation_dir: Path | None = None
    calibration_count: int | None = None
    validation_count: int = 256
    precision: str = "auto"
    target: str = "auto"
    max_batch: int | None = None
    opt_batch: int | None = None
    workspace_mb: int = 1024
    tolerance: dict[str, float] = field(default_factory=dict)
    force: bool = False
    threads: int = 0
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class Attempt:
    precision: str
    path: Path | None  # None: the FP32 ONNX itself
    report: GateReport
    excluded: list[str] = field(default_factory=list)
    speed: float | None = None  # images/s at max batch, once measured


def best_batch(backend: Backend, sample: np.ndarray) -> tuple[int, dict[int, float]]:
    """Throughput at 1, 2, 4 ... max; the smallest batch within 5% of the best (smaller waits less).

    On a small CPU a big model gains nothing from batching (VGG16 here: 6.0 img/s at 1, 5.6 at 8), and
    then batching only adds waiting; the daemon batches up to the batch this returns.
    """
    sizes = sorted({*(2**i for i in range(backend.max_batch.bit_length()) if 2**i <= backend.max_batch),
                    backend.max_batch})  # fmt: skip
    speeds = {b: images_per_second(backend, [sample], b, min_seconds=0.5, min_runs=2) for b in sizes}
    top = max(speeds.values())
    return min(b for b, v in speeds.items() if v >= 0.95 * top), speeds


class Builder:
    def __init__(self, options: BuildOptions, out: Callable[[str], None] = print) -> None:
        self.o = options
        self.out = out
        try:
            self.loaded: LoadedManifest = load_manifest(options.model_dir)
        except ApplianceError as e:
            raise BuildError(str(e)) from e
        self.manifest = self.loaded.manifest
        try:
            self.tolerance = Accuracy.model_validate({**self.manifest.accuracy.model_dump(), **options.tolerance})
        except ValueError as e:
            raise BuildError(f"A --tolerance value is invalid: {e}.") from e
        self.folder = engines_folder(options.engines_dir, self.manifest.model.name)
        self.onnx_sha = ""
        self.facts: ModelFacts | None = None
        self.calibration: ImageSet | None = None
        self.validation: ImageSet | None = None
        self.reference: np.ndarray | None = None
        self.fp32_speed: float | None = None

    # --- the steps ---------------------------------------------------------------------------

    def run(self) -> int:
        m = self.manifest
        wanted_batch = self.o.max_batch or m.batching.max_batch
        self.facts = check_model(self.loaded, wanted_batch)
        self.onnx_sha = sha256_file(self.loaded.onnx_path)
        self.out(f"model     {m.model.name} {m.model.version}: {self.loaded.onnx_path} (sha256 {self.onnx_sha[:12]})")
        self.out(
            f"checked   opset {self.facts.opset}, input {m.input.name} {self.facts.input_shape} {m.input.dtype}, "
            f"output {m.output.name} {self.facts.output_shape}; {self.facts.note}"
        )
        targets = self._targets()
        self._load_images()
        for target in targets:
            self._build_target(target)
        return 0

    def _targets(self) -> list[Target]:
        why = Host.probe().tensorrt_problem
        if self.o.target == "tensorrt":
            if why:
                raise BuildError(f"Cannot build for --target tensorrt: {why}.")
            return ["tensorrt"]
        if self.o.target == "onnxruntime":
            return ["onnxruntime"]
        if why:
            self.out(f"targets   onnxruntime (CPU) only: {why}")
            return ["onnxruntime"]
        self.out("targets   onnxruntime (CPU) and tensorrt (GPU)")
        return ["onnxruntime", "tensorrt"]

    def _load_images(self) -> None:
        m = self.manifest
        preparer = Preparer(m, self.o.limits)
        calib_dir = self.o.calibration_dir or self.loaded.folder / m.calibration.images
        count = self.o.calibration_count or m.calibration.count
        self.calibration = load_set(calib_dir, preparer, what="calibration", limit=count)
        if len(self.calibration.tensors) < m.calibration.min_count:
            raise BuildError(
                f"Only {len(self.calibration.tensors)} usable calibration images in {calib_dir} "
                f"({sum(self.calibration.skipped.values())} files skipped); at least {m.calibration.min_count} "
                "are needed (calibration.min_count in model.toml)."
            )
        self.out(f"calibrate {self.calibration.describe()}")
        val_dir = self.o.validation_dir or self.loaded.folder / m.calibration.validation
        if self.o.validation_dir is None and not val_dir.exists():
            self.out(f"validate  no {val_dir.name}/ folder: the gate uses the calibration images")
            val_dir = calib_dir
        self.validation = load_set(
            val_dir, preparer, what="validation", limit=self.o.validation_count, want_labels=True
        )
        if not self.validation.tensors:
            raise BuildError(f"No usable validation images in {val_dir}.")
        if self.validation.labels is None and self.tolerance.require_labels:
            raise BuildError(
                f"The manifest requires labelled validation images, but there are {self.validation.label_note}."
            )
        note = self.validation.label_note
        self.out(f"validate  {self.validation.describe()}; {note}")

    def _fp32_reference(self) -> None:
        """FP32 scores and speed, computed once and only when something is to be built."""
        assert self.validation is not None
        if self.reference is not None:
            return
        with self._ort(self.loaded.onnx_path) as fp32:
            self.reference = scores_in_batches(fp32, self.validation.tensors, self.manifest.output.activation)
            self.fp32_speed = images_per_second(fp32, self.validation.tensors[:1])

    def _ort(self, path: Path) -> OnnxRuntimeBackend:
        assert self.facts is not None
        backend = OnnxRuntimeBackend(
            path, output_name=self.manifest.output.name, max_batch=self.facts.max_batch, threads=self.o.threads
        )
        backend.load()
        return backend

    def _inputs_hash(self, target: Target) -> str:
        assert self.calibration is not None and self.validation is not None and self.facts is not None
        parts = {
            "recipe": BUILD_RECIPE,
            "target": target,
            "onnx": self.onnx_sha,
            "calibration": self.calibration.digest,
            "validation": self.validation.digest,
            "manifest": self.manifest.model_dump(mode="json"),
            "tolerance": self.tolerance.model_dump(),
            "precision": self.o.precision,
            "max_batch": self.facts.max_batch,
            "opt_batch": self.o.opt_batch,
            "workspace_mb": self.o.workspace_mb if target == "tensorrt" else None,
            "tensorrt": tensorrt_version() if target == "tensorrt" else None,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # --- one target ----------------------------------------------------------------------------

    def _sidecar_path(self, target: Target) -> Path:
        if target == "onnxruntime":
            return self.folder / ORT_RECORD
        gpu = cuda.gpu_info(0)
        return self.folder / f"{tensorrt_stem(gpu.name, gpu.compute_capability)}.json"

    def _build_target(self, target: Target) -> None:
        sidecar_path = self._sidecar_path(target)
        inputs = self._inputs_hash(target)
        if not self.o.force and self._reuse(sidecar_path, inputs):
            return
        chain = CHAINS[target] if self.o.precision == "auto" else [self.o.precision]
        if target == "onnxruntime" and chain == ["fp16"]:
            raise BuildError("FP16 is not built for ONNX Runtime on the CPU (it is slower than FP32 there).")
        self._fp32_reference()
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.folder) as tmp:
            work = Path(tmp)
            float_model = work / "float.onnx"
            note = prepare_float_model(self.loaded.onnx_path, float_model)
            notes = [note] if note else []
            attempt = None
            for precision in chain:
                attempt = self._attempt(target, precision, float_model, work, notes)
                status = "passed" if attempt.report.passed else "FAILED: " + "; ".join(attempt.report.failures)
                self.out(f"{target:<9} {precision}: {attempt.report.summary()} -> {status}")
                if attempt.report.passed:
                    break
                if len(chain) > 1 and precision != chain[-1]:
                    notes.append(f"{precision} failed the gate ({'; '.join(attempt.report.failures)})")
            assert attempt is not None
            if attempt.report.passed and target == "onnxruntime" and attempt.path is not None:
                attempt = self._faster_of(attempt, notes)
            if not attempt.report.passed:
                raise GateFailed(
                    f"{target} {attempt.precision} is outside the tolerance in model.toml: "
                    f"{'; '.join(attempt.report.failures)} ({attempt.report.summary()})."
                )
            self._publish(target, attempt, sidecar_path, inputs, time.perf_counter() - started, notes)

    def _faster_of(self, attempt: Attempt, notes: list[str]) -> Attempt:
        """In auto mode, an INT8 CPU model slower than FP32 (tiny models: Q/DQ overhead) is not worth serving."""
        assert attempt.path is not None and self.validation is not None and self.fp32_speed
        with self._ort(attempt.path) as backend:
            speed = images_per_second(backend, self.validation.tensors[:1])
        attempt.speed = speed
        if self.o.precision != "auto" or speed >= self.fp32_speed:
            return attempt
        notes.append(
            f"int8 passed the gate but ran at {speed:.0f} img/s against FP32's {self.fp32_speed:.0f} "
            f"({speed / self.fp32_speed:.2f}x), so FP32 is served"
        )
        return self._fp32_attempt()

    def _fp32_attempt(self) -> Attempt:
        """The FP32 ONNX served as is: gated as the reference against itself, not by running it again."""
        assert self.validation is not None and self.reference is not None
        v = self.validation
        return Attempt("fp32", None, compare(self.manifest, self.reference, self.reference, v.labels, self.tolerance,
                                             v.label_note))  # fmt: skip

    def _attempt(self, target: Target, precision: str, float_model: Path, work: Path, notes: list[str]) -> Attempt:
        assert self.calibration is not None
        if precision == "fp32" and target == "onnxruntime":
            return self._fp32_attempt()
        if precision == "int8":
            reader = TensorReader(self.manifest.input.name, self.calibration.tensors, batch=8)
            return self._int8_with_exclusions(target, float_model, work, reader, notes)
        source = float_model
        if precision == "fp16":
            source = work / "fp16.onnx"
            to_fp16(float_model, source)
        return self._make_and_gate(target, precision, source, work)

    def _make_and_gate(self, target: Target, precision: str, onnx_path: Path, work: Path) -> Attempt:
        if target == "onnxruntime":
            return Attempt(precision, onnx_path, self._gate_ort(onnx_path))
        plan = work / f"{precision}.plan"
        plan.write_bytes(self._build_plan(onnx_path))
        return Attempt(precision, plan, self._gate_trt(plan))

    def _int8_with_exclusions(
        self, target: Target, float_model: Path, work: Path, reader: TensorReader, notes: list[str]
    ) -> Attempt:
        """INT8 with every weighted layer quantized; failing the gate, keep layers in float, step by step:
        the classifier head, then also the last 2 convolutions, then instead of those the 3, then the 8
        layers whose inputs quantize worst (lowest SQNR)."""
        qdq = work / "int8.qdq.onnx"
        quantize(float_model, qdq, target, reader)
        attempt = self._make_and_gate(target, "int8", qdq, work)
        if attempt.report.passed:
            return attempt
        head = classifier_head(float_model)
        try:
            ranked = [s.node for s in rank_sensitive_nodes(float_model, qdq, reader) if s.node not in head]
        except Exception as e:  # the debug tooling cannot run every graph; the head alone is still tried
            notes.append(f"could not rank layers by sensitivity ({str(e).splitlines()[0]})")
            ranked = []
        tried: list[list[str]] = []
        # Past half the weighted layers in float, the result is no longer an INT8 model worth the name.
        most = len(weighted_nodes(float_model)) // 2
        tail = [n for n in last_convolutions(float_model, LAST_CONVOLUTIONS) if n not in head]
        for excluded in [head, head + tail, *(head + ranked[:count] for count in EXCLUSION_STEPS)]:
            if not excluded or excluded in tried or len(excluded) > most:
                continue
            tried.append(excluded)
            layers = f"{len(excluded)} layer{'s' if len(excluded) != 1 else ''}"
            self.out(f"{target:<9} int8: {attempt.report.summary()}; now keeping {layers} in float")
            candidate = work / f"int8-x{len(excluded)}.qdq.onnx"
            quantize(float_model, candidate, target, reader, exclude=excluded)
            attempt = self._make_and_gate(target, "int8", candidate, work)
            attempt.excluded = excluded
            if attempt.report.passed:
                notes.append(f"layers kept in float to pass the gate: {', '.join(excluded)}")
                return attempt
        return attempt

    def _build_plan(self, onnx_path: Path) -> bytes:
        assert self.facts is not None
        return build_plan(
            onnx_path,
            input_name=self.manifest.input.name,
            sample_shape=expected_sample_shape(self.loaded),
            max_batch=self.facts.max_batch,
            opt_batch=self.o.opt_batch or self.facts.max_batch,
            workspace_bytes=self.o.workspace_mb << 20,
            timing_cache=self.o.engines_dir / f"{self._sidecar_path('tensorrt').stem}.{TIMING_CACHE}",
        )

    def _gate(self, backend: Backend) -> GateReport:
        assert self.validation is not None and self.reference is not None
        scores = scores_in_batches(backend, self.validation.tensors, self.manifest.output.activation)
        labels, note = self.validation.labels, self.validation.label_note
        return compare(self.manifest, self.reference, scores, labels, self.tolerance, note)

    def _gate_ort(self, path: Path) -> GateReport:
        with self._ort(path) as backend:
            return self._gate(backend)

    def _trt(self, plan: Path) -> TensorRtBackend:
        assert self.facts is not None
        backend = TensorRtBackend(plan, output_name=self.manifest.output.name, max_batch=self.facts.max_batch)
        backend.load()
        return backend

    def _gate_trt(self, plan: Path) -> GateReport:
        with self._trt(plan) as backend:
            return self._gate(backend)

    # --- results ---------------------------------------------------------------------------------

    def _publish(
        self, target: Target, attempt: Attempt, sidecar_path: Path, inputs: str, seconds: float, notes: list[str]
    ) -> None:
        assert self.facts is not None and self.validation is not None and self.calibration is not None
        m = self.manifest
        # The old sidecar goes first: a crash below leaves no sidecar, never one naming the wrong file.
        sidecar_path.unlink(missing_ok=True)
        artifact, artifact_sha = "", ""
        key = ArtifactKey(
            backend=target,
            precision=attempt.precision,
            onnx_sha256=self.onnx_sha,
            calibration_sha256=self.calibration.digest if attempt.precision == "int8" else "",
        )
        speed: dict[str, Any] = {"batch": self.facts.max_batch, "fp32_onnxruntime_img_s": self.fp32_speed}
        if attempt.path is not None:
            suffix = ".onnx" if target == "onnxruntime" else ".plan"
            stem = "onnxruntime-int8" if target == "onnxruntime" else sidecar_path.stem
            final = self.folder / f"{stem}{suffix}"
            write_atomic(final, attempt.path.read_bytes())
            artifact, artifact_sha = final.name, sha256_file(final)
            if target == "tensorrt":
                gpu = cuda.gpu_info(0)
                key = key.model_copy(
                    update={
                        "gpu_name": gpu.name,
                        "compute_capability": gpu.compute_capability,
                        "tensorrt_version": tensorrt_version(),
                    }
                )
            if attempt.speed is None:
                with self._trt(final) if target == "tensorrt" else self._ort(final) as backend:
                    attempt.speed = images_per_second(backend, self.validation.tensors[:1])
            speed["artifact_img_s"] = attempt.speed
            if self.fp32_speed:
                speed["speedup_vs_fp32_onnxruntime"] = speed["artifact_img_s"] / self.fp32_speed
            size = final.stat().st_size
            fp32_size = self.loaded.onnx_path.stat().st_size
            self.out(f"artifact  {final} ({size / 2**20:.1f} MiB; the FP32 ONNX is {fp32_size / 2**20:.1f} MiB)")
            self.out(
                f"speed     batch {self.facts.max_batch}: {speed['artifact_img_s']:.1f} img/s vs FP32 on ONNX Runtime "
                f"{self.fp32_speed:.1f} img/s ({speed.get('speedup_vs_fp32_onnxruntime', 0):.2f}x, same run)"
            )
        else:
            self.out(f"artifact  none: the daemon serves the FP32 ONNX ({self.loaded.onnx_path}) on the CPU")
        served = attempt.path if attempt.path is not None else self.loaded.onnx_path
        with self._trt(served) if target == "tensorrt" else self._ort(served) as backend:
            chosen, by_batch = best_batch(backend, self.validation.tensors[0])
        speed["by_batch_img_s"] = {str(b): v for b, v in by_batch.items()}
        speed["best_batch"] = chosen
        self.out(
            "batching  img/s by batch: "
            + ", ".join(f"{b}: {v:.1f}" for b, v in by_batch.items())
            + f" -> the daemon batches up to {chosen}"
        )
        sidecar = Sidecar(
            model=m.model.name,
            model_version=m.model.version,
            key=key,
            artifact=artifact,
            artifact_sha256=artifact_sha,
            inputs_sha256=inputs,
            max_batch=self.facts.max_batch,
            opt_batch=(self.o.opt_batch or self.facts.max_batch) if target == "tensorrt" else 0,
            excluded_nodes=attempt.excluded,
            built_unix=time.time(),
            build_seconds=round(seconds, 2),
            gate={**attempt.report.to_dict(), "tolerance": self.tolerance.model_dump()},
            throughput=speed,
            notes=notes,
        )
        write_sidecar(sidecar_path, sidecar)
        for note in notes:
            self.out(f"note      {note}")
        self.out(f"wrote     {sidecar_path} ({key.precision}, built in {seconds:.0f} s)")

    def _reuse(self, sidecar_path: Path, inputs: str) -> bool:
        try:
            sidecar = read_sidecar(sidecar_path)
        except SidecarError:
            return False
        if sidecar.inputs_sha256 != inputs:
            return False
        if sidecar.artifact:
            path = self.folder / sidecar.artifact
            if not path.is_file() or sha256_file(path) != sidecar.artifact_sha256:
                return False
        what = sidecar.artifact or "FP32 ONNX served as is"
        self.out(
            f"{sidecar.key.backend:<9} up to date: {what} ({sidecar.key.precision}, built "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(sidecar.built_unix))} from the same model, images and "
            "settings); nothing to do (--force rebuilds)"
        )
        gate = sidecar.gate
        if gate:
            self.out(
                f"{'':<9} gate: agreement {gate['agreement']:.1%}, max |score diff| {gate['max_abs_diff']:.4f}, "
                f"mean {gate['mean_abs_diff']:.4f}"
            )
        return True


def clean_stale_builds(folder: Path) -> None:
    """Temporary folders a killed build left behind (never loaded: the daemon only follows sidecars)."""
    for tmp in folder.glob(".build-*"):
        shutil.rmtree(tmp, ignore_errors=True)
