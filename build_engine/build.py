"""The build: validate, calibrate, quantize, gate, fall back, write artifact + sidecar, measure, report.

Where the manifest declares a heatmap, it is added to the FP32 model before anything is made from it, so
every artifact returns it from the same call; its branch stays in float in every precision, and the gate
checks its peaks against FP32's.

The same for every backend; what differs (recipe, artifact, its name) is its target's, in build_engine/targets/.
Each backend's file declares its precision chain, tried in order until one passes the gate:
  onnxruntime (CPU): int8 -> fp32 (the FP32 ONNX served as is; FP16 is slower than FP32 on x86 CPUs)
  tensorrt (GPU):    int8 -> fp16 -> fp32
An explicit precision is tried alone; outside the tolerance the build fails with the figures.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.files.durable import write_atomic
from appliance.inference import cpu_class, registry, self_check
from appliance.inference.artifacts import (
    ArtifactKey,
    SelfCheck,
    Sidecar,
    SidecarError,
    engines_folder,
    read_sidecar,
    sha256_file,
    write_sidecar,
)
from appliance.inference.backend import BackendKind
from appliance.inference.selection import Host
from appliance.toolkit import (
    Accuracy,
    ApplianceError,
    Backend,
    InferenceConfig,
    LimitsConfig,
    LoadedManifest,
    Preparer,
    images_per_second,
    load_manifest,
    rows_in_batches,
)
from build_engine import progress
from build_engine.errors import BuildError, GateFailed
from build_engine.gate import GateReport, compare
from build_engine.image_sets import ImageSet, load_set
from build_engine.model_check import MIN_OPSET, ModelFacts, check_model
from build_engine.quantize import (
    Recipe,
    TensorReader,
    classifier_head,
    feature_producer,
    last_convolutions,
    prepare_float_model,
    quantize,
    rank_sensitive_nodes,
    to_fp16,
    weighted_nodes,
)
from build_engine.target import EARLIER_INPUT_KEYS, BuildTarget, target_for

EXCLUSION_STEPS = (3, 8)  # how many of the most sensitive layers to keep in float, after the head
LAST_CONVOLUTIONS = 2  # kept in float with the head, before the sensitivity ranking is consulted
BUILD_RECIPE = 4  # bump when the build changes in a way that should invalidate reused artifacts (4: heatmaps)


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
    threads: int = 0  # inference.threads: ONNX Runtime's
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    recipe_class: str = ""  # quantize CPU models as for this CPU class ('' = this host's); tests the other path
    device: int = 0  # inference.device: the CUDA device for TensorRT builds


@dataclass
class Attempt:
    precision: str
    path: Path | None  # None: the FP32 ONNX itself
    report: GateReport
    excluded: list[str] = field(default_factory=list)
    speed: float | None = None  # images/s at max batch, once measured
    scores: np.ndarray | None = None  # activated scores on the validation set (None: the FP32 reference)
    verdict: str = ""  # INT8 that failed every step: the sentence saying why it cannot pass here


def best_batch(backend: Backend, sample: np.ndarray) -> tuple[int, dict[int, float]]:
    """Throughput at 1, 2, 4 ... max; the smallest batch within 5% of the best (smaller waits less).

    On a small CPU a big model may gain nothing from batching, and then batching only adds waiting: it
    depends on the host, so it is measured on the one that builds, and the daemon batches up to the batch
    this returns.
    """
    sizes = sorted({*(2**i for i in range(backend.max_batch.bit_length()) if 2**i <= backend.max_batch),
                    backend.max_batch})  # fmt: skip
    speeds = {
        b: images_per_second(backend, [sample], b, min_seconds=0.5, min_runs=2)
        for b in progress.steps(sizes, "speed by batch size", len(sizes), unit="size")
    }
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
        # The nodes named under this (the heatmap's branch) stay in float in every artifact.
        self.float_branch = self.manifest.heatmap.output if self.manifest.heatmap else ""
        self.onnx_sha = ""
        self.facts: ModelFacts | None = None
        self.calibration: ImageSet | None = None
        self.validation: ImageSet | None = None
        self.reference: np.ndarray | None = None
        self.reference_heatmaps: np.ndarray | None = None
        self.fp32_speed: float | None = None
        self.cpu_class = cpu_class.detect()
        self.recipe_class = options.recipe_class or self.cpu_class
        if self.recipe_class not in cpu_class.CLASSES:
            raise BuildError(f"Unknown CPU class {self.recipe_class!r}; one of {', '.join(cpu_class.CLASSES)}.")
        try:
            # Each backend takes its settings from these as the daemon does from [inference]'s flat keys.
            self.inference = InferenceConfig(threads=options.threads, device=options.device)
        except ValueError as e:
            raise BuildError(f"A --threads or --device value is invalid: {e}.") from e

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
        if m.heatmap is not None:
            cells = " x ".join(map(str, (self.facts.heatmap_shape or [])[1:]))
            self.out(
                f"heatmap   {m.heatmap.method} on {m.heatmap.feature}: output {m.heatmap.output} ({cells} per image), "
                "built into every artifact, its branch kept in float"
            )
        targets = self._targets()
        for target in targets:
            for line in target.intro(self):
                self.out(line)
        self._load_images()
        for target in targets:
            self._build_target(target)
        return 0

    @functools.cached_property
    def host(self) -> Host:
        """This host's keys, probed once: what every artifact built here is named for and bound to."""
        return Host.probe(self.inference)

    def _targets(self) -> list[BuildTarget]:
        if self.o.target != registry.AUTO:
            kind = registry.get(self.o.target)
            if kind.remote:
                raise BuildError(
                    f"Nothing is built for {kind.name}: its model runs on servers past this host; "
                    f"--target {kind.name} --repo DIR exports the artifact `make engine` gated for them."
                )
            why = kind.unavailable_on(self.host.of(kind))
            if why:
                raise BuildError(f"Cannot build for --target {kind.name}: {why}.")
            return [target_for(kind.name)]
        # A remote backend's model runs on servers past this host: nothing of it is built here (it is exported).
        local = [kind for kind in registry.kinds() if not kind.remote]
        problems = {kind.name: kind.unavailable_on(self.host.of(kind)) for kind in local}
        usable = [kind for kind in local if not problems[kind.name]]
        targets = " and ".join(f"{kind.name} ({kind.hardware})" for kind in usable)
        why = "; ".join(problem for problem in problems.values() if problem)
        self.out(f"targets   {targets} only: {why}" if why else f"targets   {targets}")
        return [target_for(kind.name) for kind in usable]

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
        with self._open(registry.reference(), self.loaded.onnx_path) as fp32:
            self.reference, self.reference_heatmaps = self._outputs(fp32, "FP32 reference")
            with progress.bar("FP32 speed", 1, unit="measure"):
                self.fp32_speed = images_per_second(fp32, self.validation.tensors[:1])

    def _open(self, kind: BackendKind[Any], path: Path) -> Backend:
        """A loaded backend for a built artifact (or the FP32 ONNX on the reference), with the build's settings.

        With the manifest's heatmap, as the daemon opens it by default: an artifact returns its own, and the
        FP32 ONNX gets it added as it loads (the reference the gate compares heatmaps with).
        """
        assert self.facts is not None
        backend = kind.open(
            path,
            output_name=self.manifest.output.name,
            max_batch=self.facts.max_batch,
            settings=self.inference.settings_of(kind.name),
            heatmap=self.manifest.heatmap,
        )
        backend.load()
        return backend

    def _outputs(self, backend: Backend, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Activated scores (N x labels) on the validation set and, where the backend returns them, heatmaps."""
        assert self.validation is not None
        tensors = self.validation.tensors
        with progress.bar(what, len(tensors)) as running:
            rows = rows_in_batches(backend, tensors, self.manifest.output.activation, running.update)
        maps = [row.heatmap for row in rows if row.heatmap is not None]
        heatmaps = np.stack(maps) if maps and len(maps) == len(rows) else None
        return np.stack([row.scores for row in rows]), heatmaps

    def _inputs_hash(self, target: BuildTarget) -> str:
        assert self.calibration is not None and self.validation is not None and self.facts is not None
        parts = {
            "recipe": BUILD_RECIPE,
            "target": target.name,
            "onnx": self.onnx_sha,
            "calibration": self.calibration.digest,
            "validation": self.validation.digest,
            "manifest": self.manifest.model_dump(mode="json"),
            "tolerance": self.tolerance.model_dump(),
            "precision": self.o.precision,
            "max_batch": self.facts.max_batch,
            "opt_batch": self.o.opt_batch,
            **dict.fromkeys(EARLIER_INPUT_KEYS),
            **target.inputs(self),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # --- one target ----------------------------------------------------------------------------

    def sidecar_path(self, target: BuildTarget) -> Path:
        kind = target.kind
        return self.folder / f"{kind.stem(self.host.of(kind))}.json"

    def _build_target(self, target: BuildTarget) -> None:
        sidecar_path = self.sidecar_path(target)
        inputs = self._inputs_hash(target)
        if not self.o.force and self._reuse(target, sidecar_path, inputs):
            return
        chain = list(target.kind.precisions) if self.o.precision == "auto" else [self.o.precision]
        assert self.facts is not None
        if "int8" in chain and self.facts.opset < MIN_OPSET:
            why = (f"per-channel int8 (QuantizeLinear with an axis) needs ONNX opset {MIN_OPSET} or later and "
                   f"{self.loaded.onnx_path.name} uses opset {self.facts.opset}: re-export it, or convert it with "
                   "onnx.version_converter")  # fmt: skip
            if chain == ["int8"]:
                raise BuildError(why[0].upper() + why[1:] + ".")
            self.out(f"{target.name:<9} int8 skipped: {why}")
            chain = [c for c in chain if c != "int8"]
        refused = target.refuses(self.o.precision)
        if refused:
            raise BuildError(refused)
        self._fp32_reference()
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.folder) as tmp:
            work = Path(tmp)
            float_model = work / "float.onnx"
            note = prepare_float_model(self.loaded.onnx_path, float_model, self.manifest.heatmap)
            notes = [note] if note else []
            attempt = None
            int8_verdict = ""  # why INT8 cannot pass here, kept for the failure's sentence
            for precision in chain:
                attempt = self._attempt(target, precision, float_model, work, notes)
                int8_verdict = attempt.verdict or int8_verdict
                status = "passed" if attempt.report.passed else "FAILED: " + "; ".join(attempt.report.failures)
                self.out(f"{target.name:<9} {precision}: {attempt.report.summary()} -> {status}")
                if attempt.report.passed:
                    break
                if len(chain) > 1 and precision != chain[-1]:
                    notes.append(f"{precision} failed the gate ({'; '.join(attempt.report.failures)})")
                    # Where the FP32 ONNX as is comes next, the note says what serving it costs.
                    if target.kind.serves_reference and attempt.path is not None:
                        notes.append(self._what_was_given_up(target, attempt))
            assert attempt is not None
            if attempt.report.passed and target.kind.serves_reference and attempt.path is not None:
                attempt = self._faster_of(target, attempt, notes)
            if not attempt.report.passed:
                raise GateFailed(
                    f"{target.name} {attempt.precision} is outside the tolerance in model.toml: "
                    f"{'; '.join(attempt.report.failures)} ({attempt.report.summary()})."
                    + (f" {int8_verdict}." if int8_verdict else "")
                )
            self._publish(target, attempt, sidecar_path, inputs, time.perf_counter() - started, notes)

    def _faster_of(self, target: BuildTarget, attempt: Attempt, notes: list[str]) -> Attempt:
        """In auto mode, an INT8 CPU model slower than FP32 (tiny models: Q/DQ overhead) is not worth serving."""
        assert attempt.path is not None and self.validation is not None and self.fp32_speed
        with self._open(target.kind, attempt.path) as backend:
            speed = images_per_second(backend, self.validation.tensors[:1])
        attempt.speed = speed
        if self.o.precision != "auto" or speed >= self.fp32_speed:
            return attempt
        notes.append(
            f"int8 passed the gate but ran at {speed:.0f} img/s against FP32's {self.fp32_speed:.0f} "
            f"({speed / self.fp32_speed:.2f}x), so FP32 is served"
        )
        return self._fp32_attempt()

    def _what_was_given_up(self, target: BuildTarget, attempt: Attempt) -> str:
        """The speed the failed INT8 model would have given, measured in this run: what the gate costs."""
        assert attempt.path is not None and self.validation is not None and self.fp32_speed
        with self._open(target.kind, attempt.path) as backend:
            speed = images_per_second(backend, self.validation.tensors[:1])
        return (
            f"the last INT8 model tried ran {speed:.1f} img/s against FP32's {self.fp32_speed:.1f} "
            f"({speed / self.fp32_speed:.2f}x, same run); FP32 is served for the accuracy"
        )

    def _fp32_attempt(self) -> Attempt:
        """The FP32 ONNX served as is: gated as the reference against itself, not by running it again."""
        assert self.validation is not None and self.reference is not None
        v, maps = self.validation, self.reference_heatmaps
        report = compare(self.manifest, self.reference, self.reference, v.labels, self.tolerance, v.label_note,
                         reference_heatmaps=maps, candidate_heatmaps=maps)  # fmt: skip
        return Attempt("fp32", None, report)

    def _attempt(self, target: BuildTarget, precision: str, float_model: Path, work: Path, notes: list[str]) -> Attempt:
        assert self.calibration is not None
        if precision == "fp32" and target.kind.serves_reference:
            return self._fp32_attempt()
        if precision == "int8":
            reader = TensorReader(self.manifest.input.name, self.calibration.tensors, batch=8)
            return self._int8_with_exclusions(target, float_model, work, reader, notes)
        source = float_model
        if precision == "fp16":
            source = work / "fp16.onnx"
            to_fp16(float_model, source, self.float_branch)
        return self._make_and_gate(target, precision, source, work)

    def _make_and_gate(
        self, target: BuildTarget, precision: str, onnx_path: Path, work: Path, step: str = ""
    ) -> Attempt:
        artifact = target.make(self, onnx_path, precision, work)
        with self._open(target.kind, artifact) as backend:
            report, scores = self._gate(backend, f"gate: {target.name} {precision}{step}")
        return Attempt(precision, artifact, report, scores=scores)

    def _int8_with_exclusions(
        self, target: BuildTarget, float_model: Path, work: Path, reader: TensorReader, notes: list[str]
    ) -> Attempt:
        """INT8 with every weighted layer quantized; failing the gate, keep layers in float, step by step:
        the classifier head, then (where the heatmap's peaks failed) also the layer that makes its feature
        maps, whose rounding the heatmap shows directly, then also the last 2 convolutions, then instead of
        those the 3, then the 8 layers whose inputs quantize worst (lowest SQNR)."""
        qdq = work / "int8.qdq.onnx"
        recipe = target.recipe(self)
        quantize(float_model, qdq, recipe, reader, keep_float=self.float_branch)
        attempt = self._make_and_gate(target, "int8", qdq, work)
        if attempt.report.passed:
            return attempt
        branch = self.float_branch
        head = classifier_head(float_model, branch)
        try:
            ranked = [s.node for s in rank_sensitive_nodes(float_model, qdq, reader, keep_float=branch)
                      if s.node not in head]  # fmt: skip
        except Exception as e:  # the debug tooling cannot run every graph; the head alone is still tried
            notes.append(f"could not rank layers by sensitivity ({str(e).splitlines()[0]})")
            ranked = []
        tried: list[list[str]] = []
        # Past half the weighted layers in float, the result is no longer an INT8 model worth the name.
        most = len(weighted_nodes(float_model, branch)) // 2
        tail = [n for n in last_convolutions(float_model, LAST_CONVOLUTIONS, branch) if n not in head]
        makes_maps: list[str] = []
        peaks = attempt.report.heatmap_agreement
        if self.manifest.heatmap is not None and peaks is not None and peaks < self.tolerance.min_heatmap_agreement:
            makes_maps = [n for n in feature_producer(float_model, self.manifest.heatmap.feature) if n not in head]
        # Once the heatmap's peaks needed the maps' layer in float, every later step keeps it there too.
        base = head + makes_maps
        steps = [
            head,
            base,
            base + [n for n in tail if n not in base],
            *(base + [n for n in ranked[:count] if n not in base] for count in EXCLUSION_STEPS),
        ]
        planned: list[list[str]] = []
        for excluded in steps:
            if excluded and excluded not in planned and len(excluded) <= most:
                planned.append(excluded)
        for number, excluded in enumerate(planned, 1):
            tried.append(excluded)
            layers = f"{len(excluded)} layer{'s' if len(excluded) != 1 else ''}"
            self.out(
                f"{target.name:<9} int8: {attempt.report.summary()}; now keeping {layers} in float "
                f"(step {number} of at most {len(planned)})"
            )
            candidate = work / f"int8-x{len(excluded)}.qdq.onnx"
            quantize(float_model, candidate, recipe, reader, exclude=excluded, keep_float=branch)
            attempt = self._make_and_gate(target, "int8", candidate, work, f", {layers} in float")
            attempt.excluded = excluded
            if attempt.report.passed:
                notes.append(f"layers kept in float to pass the gate: {', '.join(excluded)}")
                return attempt
        attempt.verdict = self._why_int8_failed(recipe, attempt, len(tried))
        notes.append(attempt.verdict)
        return attempt

    def _why_int8_failed(self, recipe: Recipe, attempt: Attempt, steps: int) -> str:
        """One sentence, not only figures: what the recipe already did and what still moved too much."""
        worst = attempt.report.failures[0] if attempt.report.failures else "outside the tolerance"
        return (
            f"INT8 cannot pass the gate here: {recipe.kernels}, so the loss is 8-bit rounding itself, and with up to "
            f"{len(attempt.excluded)} layers kept in float over {steps} steps it still gave {worst}"
            f"{self._where_it_moved(attempt)}"
        )

    def _where_it_moved(self, attempt: Attempt) -> str:
        """Which images moved past the score tolerance, by how sure FP32 was of them."""
        if attempt.scores is None or self.reference is None:
            return ""
        moved = np.abs(attempt.scores - self.reference).max(axis=1) > self.tolerance.max_abs_diff
        if not moved.any():
            return ""
        sure = self.reference.max(axis=1)[moved]
        where = f": {int(moved.sum())} of {len(moved)} images moved by more than {self.tolerance.max_abs_diff}"
        if sure.max() < 0.9:  # short of saturation the output is steep: small changes inside move it most
            where += f", all with a top FP32 score between {sure.min():.2f} and {sure.max():.2f}"
        return where

    def _gate(self, backend: Backend, what: str) -> tuple[GateReport, np.ndarray]:
        assert self.validation is not None and self.reference is not None
        scores, heatmaps = self._outputs(backend, what)
        labels, note = self.validation.labels, self.validation.label_note
        report = compare(self.manifest, self.reference, scores, labels, self.tolerance, note,
                         reference_heatmaps=self.reference_heatmaps, candidate_heatmaps=heatmaps)  # fmt: skip
        return report, scores

    # --- results ---------------------------------------------------------------------------------

    def _publish(
        self, target: BuildTarget, attempt: Attempt, sidecar_path: Path, inputs: str, seconds: float, notes: list[str]
    ) -> None:
        assert self.facts is not None and self.validation is not None and self.calibration is not None
        m = self.manifest
        # The old sidecar goes first: a crash below leaves no sidecar, never one naming the wrong file.
        sidecar_path.unlink(missing_ok=True)
        artifact, artifact_sha = "", ""
        kind = target.kind
        key = ArtifactKey(
            backend=kind.name,
            precision=attempt.precision,
            onnx_sha256=self.onnx_sha,
            calibration_sha256=self.calibration.digest if attempt.precision == "int8" else "",
            **kind.host_key(self.host.of(kind)),
        )
        speed: dict[str, Any] = {"batch": self.facts.max_batch, "fp32_onnxruntime_img_s": self.fp32_speed}
        check = None
        served = self.loaded.onnx_path
        if attempt.path is not None:
            stem = target.artifact_stem(sidecar_path.stem, attempt.precision)
            served = self.folder / f"{stem}{target.suffix}"
            write_atomic(served, attempt.path.read_bytes())
            artifact, artifact_sha = served.name, sha256_file(served)
        # One load of what the daemon will serve, for its self-check, its speed and its best batch.
        backend = self._open(kind, served)
        with backend:
            if attempt.path is not None:
                check = self._record_self_check(backend, attempt, self.folder / f"{stem}.selfcheck.npz")
                if attempt.speed is None:
                    attempt.speed = images_per_second(backend, self.validation.tensors[:1])
            chosen, by_batch = best_batch(backend, self.validation.tensors[0])
        if attempt.path is not None:
            speed["artifact_img_s"] = attempt.speed
            if self.fp32_speed:
                speed["speedup_vs_fp32_onnxruntime"] = speed["artifact_img_s"] / self.fp32_speed
            size = served.stat().st_size
            fp32_size = self.loaded.onnx_path.stat().st_size
            self.out(f"artifact  {served} ({size / 2**20:.1f} MiB; the FP32 ONNX is {fp32_size / 2**20:.1f} MiB)")
            self.out(
                f"speed     batch {self.facts.max_batch}: {speed['artifact_img_s']:.1f} img/s vs FP32 on ONNX Runtime "
                f"{self.fp32_speed:.1f} img/s ({speed.get('speedup_vs_fp32_onnxruntime', 0):.2f}x, same run)"
            )
            notes.extend(target.speed_notes(self, speed.get("speedup_vs_fp32_onnxruntime", 0.0), attempt))
        else:
            fp32 = self.loaded.onnx_path
            self.out(f"artifact  none: the daemon serves the FP32 ONNX ({fp32}) on the {kind.hardware}")
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
            opt_batch=target.opt_batch(self),
            excluded_nodes=attempt.excluded,
            recipe=target.recipe(self).to_dict() if attempt.precision == "int8" else {},
            self_check=check,
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

    def _record_self_check(self, backend: Backend, attempt: Attempt, path: Path) -> SelfCheck:
        """A few of the gate's images, those where the artifact strayed most from FP32, with its scores."""
        assert self.validation is not None and self.reference is not None and attempt.scores is not None
        picked = self_check.most_strayed(self.reference, attempt.scores)
        inputs = [self.validation.tensors[i] for i in picked]
        check = self_check.record(backend, inputs, self.manifest.output.activation, path)
        self.out(f"selfcheck {path.name}: {check.count} of the gate's images, rerun at every load")
        return check

    def _self_check_problem(self, target: BuildTarget, sidecar: Sidecar, artifact: Path) -> str:
        """Why the daemon would refuse this artifact at load ('' if it would not): the same check it runs."""
        try:
            with self._open(target.kind, artifact) as backend:
                return self_check.verify(backend, artifact.parent, sidecar.self_check, self.manifest.output.activation)
        except ApplianceError as e:
            return f"{artifact.name} does not load ({e})"

    def _reuse(self, target: BuildTarget, sidecar_path: Path, inputs: str) -> bool:
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
            problem = self._self_check_problem(target, sidecar, path)
            if problem:
                # What the daemon refused, `make engine` must not call up to date: it rebuilds.
                self.out(f"{sidecar.key.backend:<9} rebuilding: {problem}")
                return False
        what = sidecar.artifact or "FP32 ONNX served as is"
        self.out(
            f"{sidecar.key.backend:<9} up to date: {what} ({sidecar.key.precision}, built "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(sidecar.built_unix))} from the same model, images and "
            "settings); nothing to do (--force rebuilds)"
        )
        gate = sidecar.gate
        if gate:
            peaks = gate.get("heatmap_agreement")
            self.out(
                f"{'':<9} gate: agreement {gate['agreement']:.1%}, max |score diff| {gate['max_abs_diff']:.4f}, "
                f"mean {gate['mean_abs_diff']:.4f}" + ("" if peaks is None else f", heatmap peaks {peaks:.1%}")
            )
        return True


def clean_stale_builds(folder: Path) -> None:
    """Temporary folders a killed build left behind (never loaded: the daemon only follows sidecars)."""
    for tmp in folder.glob(".build-*"):
        shutil.rmtree(tmp, ignore_errors=True)
