"""`python -m build_engine --target triton --repo DIR`: a Triton model repository of the gated artifact, its
configuration in Triton's schema, and the sidecar the appliance checks the served model against."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import ArtifactKey, SelfCheck, Sidecar, read_sidecar, sha256_file, write_sidecar
from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend
from appliance.inference.self_check import verify
from appliance.kserve import triton_config_pb2 as tc

from .conftest import build, drop_heatmap

NAME = "pipeline-test"


def export(model: Path, engines: Path, repo: Path, *args: str | Path) -> str:
    r = build("--model", model, "--engines", engines, "--target", "triton", "--repo", repo, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def refusal(model: Path, engines: Path, *args: str | Path) -> str:
    """stderr of a run that must exit 2 with one sentence."""
    r = build("--model", model, "--engines", engines, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_engine: ") and lines[0].endswith("."), r.stderr
    return lines[0]


def read_config(path: Path) -> tc.ModelConfig:
    # text_format.Parse refuses a field the message does not declare, so this is Triton's schema (its subset).
    return text_format.Parse(path.read_text(), tc.ModelConfig())


def inputs(model: Path, count: int = 16) -> np.ndarray:
    """Inputs of the model's shape, spread as its preprocessing spreads images (mean 0, a few units wide)."""
    spec = load_manifest(model).manifest.input
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, (count, spec.channels, spec.height, spec.width)).astype(np.float32)


def local(path: Path, model: Path) -> OnnxRuntimeBackend:
    """The exported file on the appliance's own onnxruntime backend, as `make engine` checks artifacts."""
    manifest = load_manifest(model).manifest
    backend = OnnxRuntimeBackend(path, output_name=manifest.output.name, max_batch=16, heatmap=manifest.heatmap)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def fp32_export(pipeline_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An FP32 export (no INT8 built) with options of its own, under a config whose batching delay is 2.5 ms."""
    root = tmp_path_factory.mktemp("triton")
    config = root / "appliance.toml"
    config.write_text("[inference]\nmax_delay_ms = 2.5\n")
    engines, repo = root / "engines", root / "repo"
    stdout = export(
        pipeline_model, engines, repo, "--config", config, "--precision", "fp32", "--instances", "2",
        "--triton-version", "3",
    )  # fmt: skip
    return engines, repo, stdout


def test_the_config_parses_as_triton_model_config_and_says_what_the_manifest_says(
    pipeline_model: Path, fp32_export: tuple[Path, Path, str]
) -> None:
    _, repo, _ = fp32_export
    manifest = load_manifest(pipeline_model).manifest
    assert manifest.heatmap is not None  # pipeline-test declares [heatmap]: its output is served too
    config = read_config(repo / NAME / "config.pbtxt")
    assert config.name == NAME and config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    assert list(config.version_policy.specific.versions) == [3]
    assert config.max_batch_size == manifest.batching.max_batch == 16
    (image,) = config.input
    assert image.name == manifest.input.name and image.data_type == tc.TYPE_FP32
    assert image.format == tc.ModelInput.FORMAT_NCHW and list(image.dims) == [1, 64, 64]  # no batch axis
    outputs = {o.name: o for o in config.output}
    assert list(outputs) == [manifest.output.name, manifest.heatmap.output]
    assert list(outputs["logit"].dims) == [len(manifest.output.labels)]
    assert outputs["logit"].data_type == outputs["heatmap"].data_type == tc.TYPE_FP32
    assert list(outputs["heatmap"].dims) == [8, 8]  # 64 px over the features' stride of 8
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, tc.ModelInstanceGroup.KIND_CPU)]


def test_the_schema_check_refuses_a_field_triton_does_not_know(fp32_export: tuple[Path, Path, str]) -> None:
    _, repo, _ = fp32_export
    text = (repo / NAME / "config.pbtxt").read_text() + "max_batch_sizes: 4\n"
    with pytest.raises(text_format.ParseError, match="max_batch_sizes"):
        text_format.Parse(text, tc.ModelConfig())


def test_the_exported_fp32_model_scores_as_the_original_and_returns_the_heatmap(
    pipeline_model: Path, fp32_export: tuple[Path, Path, str]
) -> None:
    _, repo, _ = fp32_export
    exported = repo / NAME / "3" / "model.onnx"
    with np.load(repo / NAME / "3" / "appliance.selfcheck.npz") as recorded:  # real images, as prepared
        batch = np.concatenate([recorded["inputs"], inputs(pipeline_model)])
    original = ort.InferenceSession(str(pipeline_model / "model.onnx"), providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [o.name for o in served.get_outputs()] == ["logit", "heatmap"]
    (want,) = original.run(["logit"], {"image": batch})
    got, heatmap = served.run(["logit", "heatmap"], {"image": batch})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert heatmap.shape == (len(batch), 8, 8) and heatmap.min() >= 0 and heatmap.max() <= 1
    assert heatmap.max() > 0.5  # each map is scaled to its own peak


def test_the_sidecar_reads_back_and_its_self_check_passes_on_the_exported_file(
    pipeline_model: Path, fp32_export: tuple[Path, Path, str]
) -> None:
    engines, repo, stdout = fp32_export
    version = repo / NAME / "3"
    sidecar = read_sidecar(version / "appliance.json")
    assert sidecar.key.backend == "triton" and sidecar.key.precision == "fp32"
    assert sidecar.key.onnx_sha256 == sha256_file(pipeline_model / "model.onnx")
    assert sidecar.artifact == "model.onnx" and sidecar.artifact_sha256 == sha256_file(version / "model.onnx")
    assert sidecar.max_batch == 16
    assert sidecar.recipe == {
        "source": "onnxruntime",
        "triton_model": NAME,
        "triton_version": 3,
        "platform": "onnxruntime_onnx",
        "source_artifact": "model.onnx",
    }
    assert sidecar.self_check is not None and sidecar.self_check.count == 4
    assert sidecar.self_check.file == "appliance.selfcheck.npz"
    activation = load_manifest(pipeline_model).manifest.output.activation
    with local(version / "model.onnx", pipeline_model) as backend:
        assert verify(backend, version, sidecar.self_check, activation) == ""
        # The engines folder's copy is the one the appliance reads: the same record, its self-check beside it.
        copy = read_sidecar(engines / NAME / f"triton-{NAME}.json")
        assert copy.self_check is not None and copy.self_check.file == f"triton-{NAME}.selfcheck.npz"
        assert verify(backend, engines / NAME, copy.self_check, activation) == ""
    assert copy.model_dump(exclude={"self_check"}) == sidecar.model_dump(exclude={"self_check"})
    assert copy.self_check.sha256 == sidecar.self_check.sha256
    for line in (f"{version / 'model.onnx'} (fp32, heatmap yes)", "max batch 16", f"copy {repo / NAME} into"):
        assert line in stdout, line


def test_an_int8_export_serves_the_gated_int8_model(pipeline_model: Path, int8_engines: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(int8_engines, engines)  # the shared build stays as it was
    stdout = export(pipeline_model, engines, tmp_path / "repo")  # auto: the INT8 that passed the gate here
    (record,) = (engines / NAME).glob("onnxruntime-*.json")
    gated = read_sidecar(record)
    version = tmp_path / "repo" / NAME / "1"
    sidecar = read_sidecar(version / "appliance.json")
    assert sidecar.key.precision == gated.key.precision == "int8"
    assert sha256_file(version / "model.onnx") == gated.artifact_sha256  # the very file that was gated
    assert sidecar.recipe["source_artifact"] == gated.artifact and sidecar.gate == gated.gate
    assert sidecar.self_check is not None and gated.self_check is not None
    assert sidecar.self_check.tolerance == gated.self_check.tolerance
    with np.load(version / "appliance.selfcheck.npz") as ours, np.load(engines / NAME / gated.self_check.file) as its:
        np.testing.assert_array_equal(ours["inputs"], its["inputs"])
        np.testing.assert_allclose(ours["scores"], its["scores"], rtol=0, atol=1e-6)
    activation = load_manifest(pipeline_model).manifest.output.activation
    with local(version / "model.onnx", pipeline_model) as backend:
        assert backend.has_heatmap  # built into the INT8 model by `make engine`
        assert verify(backend, version, sidecar.self_check, activation) == ""
    assert "(int8, heatmap yes)" in stdout and "gated on this host's CPU" in stdout
    assert "heatmap" in [o.name for o in read_config(tmp_path / "repo" / NAME / "config.pbtxt").output]


def test_make_engine_without_a_target_exports_nothing_for_triton(int8_engines: Path) -> None:
    assert not list((int8_engines / NAME).glob("triton-*"))


def test_int8_without_a_gated_int8_model_is_refused_with_one_sentence(pipeline_model: Path, tmp_path: Path) -> None:
    line = refusal(pipeline_model, tmp_path / "engines", "--target", "triton", "--repo", tmp_path / "repo",
                   "--precision", "int8")  # fmt: skip
    assert "no gated INT8 model of pipeline-test" in line and "make engine" in line
    assert not (tmp_path / "repo").exists()  # refused before anything was written


def test_the_target_and_the_repository_go_together(pipeline_model: Path, tmp_path: Path) -> None:
    assert "--repo DIR" in refusal(pipeline_model, tmp_path, "--target", "triton")
    assert "--repo is for --target triton" in refusal(pipeline_model, tmp_path, "--repo", tmp_path / "repo")
    usage = build("--help").stdout
    assert all(
        option in usage for option in ("--repo", "--source", "--instances", "--triton-model", "--triton-version")
    )


def test_a_second_export_replaces_the_model_folder_whole(pipeline_model: Path, tmp_path: Path) -> None:
    engines, repo = tmp_path / "engines", tmp_path / "repo"
    export(pipeline_model, engines, repo, "--precision", "fp32")
    (repo / NAME / "1" / "stray.onnx").write_bytes(b"left from before")
    (repo / "other-model").mkdir()  # another model in the same repository is left alone
    export(pipeline_model, engines, repo, "--precision", "fp32", "--triton-version", "2")
    assert sorted(p.name for p in repo.iterdir()) == ["other-model", NAME]  # no staging folder left behind
    assert sorted(p.name for p in (repo / NAME).iterdir()) == ["2", "config.pbtxt"]
    assert list(read_config(repo / NAME / "config.pbtxt").version_policy.specific.versions) == [2]
    assert read_sidecar(engines / NAME / f"triton-{NAME}.json").recipe["triton_version"] == 2


def test_a_model_named_for_the_server_names_its_records(pipeline_model: Path, tmp_path: Path) -> None:
    engines, repo = tmp_path / "engines", tmp_path / "repo"
    export(pipeline_model, engines, repo, "--precision", "fp32", "--triton-model", "lesions_v2")
    assert read_config(repo / "lesions_v2" / "config.pbtxt").name == "lesions_v2"
    assert read_sidecar(engines / NAME / "triton-lesions_v2.json").recipe["triton_model"] == "lesions_v2"
    assert "cannot name a Triton model" in refusal(
        pipeline_model, engines, "--target", "triton", "--repo", repo, "--triton-model", "../up"
    )


def test_a_model_with_its_batch_axis_fixed_at_1_is_not_batched_by_triton(pipeline_model: Path, tmp_path: Path) -> None:
    model = tmp_path / NAME
    shutil.copytree(pipeline_model, model, ignore=shutil.ignore_patterns("calibration"))
    graph = onnx.load(str(model / "model.onnx"))
    for value in (*graph.graph.input, *graph.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    del graph.graph.value_info[:]
    onnx.save(graph, str(model / "model.onnx"))
    export(model, tmp_path / "engines", tmp_path / "repo", "--precision", "fp32")
    config = read_config(tmp_path / "repo" / NAME / "config.pbtxt")
    # Triton's rule for a model that does not batch: max_batch_size 0, the dims hold the batch axis.
    assert config.max_batch_size == 0 and config.WhichOneof("scheduling_choice") is None
    assert list(config.input[0].dims) == [1, 1, 64, 64]
    assert config.input[0].format == tc.ModelInput.FORMAT_NONE  # Triton takes NCHW or NHWC on 3 dims only
    assert {o.name: list(o.dims) for o in config.output} == {"logit": [1, 1], "heatmap": [1, 8, 8]}


def test_a_tensorrt_plan_is_exported_as_it_was_gated(pipeline_model: Path, tmp_path: Path) -> None:
    """A plan runs only on its GPU, so the export copies it with its own self-check and never runs it: this
    plan's bytes stand in for one `make engine` built and gated on an H100."""
    engines, repo = tmp_path / "engines", tmp_path / "repo"
    folder = engines / NAME
    folder.mkdir(parents=True)
    plan = folder / "tensorrt-nvidia-h100.plan"
    plan.write_bytes(b"a serialized engine")
    check = folder / "tensorrt-nvidia-h100.selfcheck.npz"
    np.savez_compressed(check, inputs=inputs(pipeline_model, 4), scores=np.full((4, 1), 0.25))
    onnx_sha = sha256_file(pipeline_model / "model.onnx")
    key = ArtifactKey(backend="tensorrt", precision="fp16", onnx_sha256=onnx_sha, gpu_name="NVIDIA H100",
                      compute_capability="9.0", sm_count=132, tensorrt_version="10.13")  # fmt: skip
    gated = Sidecar(
        model=NAME, model_version="1.0.0", key=key, artifact=plan.name, artifact_sha256=sha256_file(plan),
        inputs_sha256="x", max_batch=8, opt_batch=8, built_unix=0.0, build_seconds=1.0,
        self_check=SelfCheck(file=check.name, sha256=sha256_file(check), count=4, tolerance=2e-3),
    )  # fmt: skip
    write_sidecar(folder / "tensorrt-nvidia-h100.json", gated)
    args = ("--target", "triton", "--repo", repo, "--source", "tensorrt")
    assert "is fp16, not int8" in refusal(pipeline_model, engines, *args, "--precision", "int8")
    stdout = export(pipeline_model, engines, repo, "--source", "tensorrt")
    version = repo / NAME / "1"
    assert (version / "model.plan").read_bytes() == plan.read_bytes()
    config = read_config(repo / NAME / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.max_batch_size == 8  # the plan's profile, under the manifest's 16
    assert [g.kind for g in config.instance_group] == [tc.ModelInstanceGroup.KIND_GPU]
    assert [o.name for o in config.output] == ["logit", "heatmap"]
    sidecar = read_sidecar(version / "appliance.json")
    assert sidecar.key.backend == "triton" and sidecar.key.precision == "fp16" and sidecar.artifact == "model.plan"
    assert sidecar.recipe["platform"] == "tensorrt_plan" and sidecar.recipe["source"] == "tensorrt"
    assert sidecar.self_check is not None and gated.self_check is not None
    assert sidecar.self_check.sha256 == gated.self_check.sha256 and sidecar.self_check.tolerance == 2e-3
    assert (version / "appliance.selfcheck.npz").read_bytes() == check.read_bytes()
    assert "NVIDIA H100" in stdout and "(fp16, heatmap yes)" in stdout


def test_a_model_without_a_heatmap_serves_its_scores_alone(pipeline_model: Path, tmp_path: Path) -> None:
    model = tmp_path / NAME
    shutil.copytree(pipeline_model, model, ignore=shutil.ignore_patterns("calibration"))
    drop_heatmap(model)
    stdout = export(model, tmp_path / "engines", tmp_path / "repo", "--precision", "fp32")
    assert [o.name for o in read_config(tmp_path / "repo" / NAME / "config.pbtxt").output] == ["logit"]
    exported = tmp_path / "repo" / NAME / "1" / "model.onnx"
    assert exported.read_bytes() == (model / "model.onnx").read_bytes()  # the reference, as it is
    assert "(fp32, heatmap no)" in stdout
