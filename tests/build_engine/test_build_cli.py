"""`python -m build_engine` on the CPU for real: quantize, gate, fall back, reuse, and refuse bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from appliance.inference.artifacts import read_sidecar, sha256_file
from appliance.inference.backends.onnxruntime import onnxruntime_stem
from appliance.inference.cpu_class import detect

from .conftest import INT8, build, drop_heatmap

RECORD = Path("pipeline-test") / f"{onnxruntime_stem(detect())}.json"


def test_help_documents_every_option() -> None:
    r = build("--help")
    assert r.returncode == 0
    for option in (
        "--model",
        "--calibration",
        "--validation",
        "--precision",
        "--target",
        "--max-batch",
        "--workspace-mb",
        "--tolerance",
        "labels.csv",
        "min_agreement",
        "min_heatmap_agreement",
    ):
        assert option in r.stdout, option


def test_int8_build_writes_artifact_and_sidecar_with_the_gate(pipeline_model: Path, int8_engines: Path) -> None:
    sidecar = read_sidecar(int8_engines / RECORD)
    artifact = int8_engines / "pipeline-test" / sidecar.artifact
    assert sidecar.key.backend == "onnxruntime" and sidecar.key.precision == "int8"
    assert sidecar.key.onnx_sha256 == sha256_file(pipeline_model / "model.onnx")
    assert sidecar.artifact_sha256 == sha256_file(artifact)
    assert sidecar.gate["passed"] and sidecar.gate["images"] == 128
    tolerance = sidecar.gate["tolerance"]  # the figures themselves depend on the CPU's int8 kernels
    assert sidecar.gate["agreement"] >= tolerance["min_agreement"] > 0
    assert sidecar.gate["max_abs_diff"] <= tolerance["max_abs_diff"]
    assert sidecar.key.cpu_class == detect() and sidecar.key.onnxruntime_version
    assert sidecar.recipe["chosen_for"] == detect()
    assert sidecar.self_check is not None and sidecar.self_check.count == 4
    assert sidecar.self_check.sha256 == sha256_file(int8_engines / "pipeline-test" / sidecar.self_check.file)
    assert sidecar.gate["auc"]["lesion"]["fp32"] > 0.9  # labelled by sub-folder: lesion/ and none/
    assert sidecar.throughput["artifact_img_s"] > 0 and sidecar.throughput["fp32_onnxruntime_img_s"] > 0
    # Measured per batch size, so the daemon batches no further than pays on this host.
    assert sorted(map(int, sidecar.throughput["by_batch_img_s"])) == [1, 2, 4, 8, 16]
    assert str(sidecar.throughput["best_batch"]) in sidecar.throughput["by_batch_img_s"]
    assert not list((int8_engines / "pipeline-test").glob(".build-*"))  # the work folder is gone


def test_a_second_run_with_nothing_changed_reuses_the_artifact(pipeline_model: Path, int8_engines: Path) -> None:
    before = (int8_engines / RECORD).read_bytes()
    r = build("--model", pipeline_model, "--engines", int8_engines, *INT8)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout and "nothing to do" in r.stdout
    assert (int8_engines / RECORD).read_bytes() == before


@pytest.mark.slow  # a build of its own
def test_two_builds_from_the_same_inputs_give_the_same_artifact(
    pipeline_model: Path, int8_engines: Path, tmp_path: Path
) -> None:
    r = build("--model", pipeline_model, "--engines", tmp_path, *INT8)
    assert r.returncode == 0, r.stderr
    assert read_sidecar(tmp_path / RECORD).artifact_sha256 == read_sidecar(int8_engines / RECORD).artifact_sha256


@pytest.mark.slow  # a build of its own
def test_outside_the_tolerance_auto_falls_back_to_fp32_and_says_so(pipeline_model: Path, tmp_path: Path) -> None:
    r = build("--model", pipeline_model, "--engines", tmp_path, "--tolerance", "max_abs_diff=0.000001")
    assert r.returncode == 0, r.stderr
    assert "now keeping 1 layer in float" in r.stdout  # the classifier head in float was tried first
    assert "int8: " in r.stdout and "FAILED" in r.stdout
    sidecar = read_sidecar(tmp_path / RECORD)
    assert sidecar.key.precision == "fp32" and sidecar.artifact == ""
    assert any("int8 failed the gate" in note for note in sidecar.notes)
    # Why, in a sentence, not only the figures.
    assert any(note.startswith("INT8 cannot pass the gate here: ") for note in sidecar.notes)
    assert sidecar.key.cpu_class == detect()  # FP32 served because of what INT8 did on this CPU class
    assert not list((tmp_path / "pipeline-test").glob("*.onnx"))


@pytest.mark.slow  # a build of its own
def test_explicit_int8_outside_the_tolerance_exits_non_zero_with_the_figures(
    pipeline_model: Path, int8_engines: Path, tmp_path: Path
) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(int8_engines, engines)
    r = build("--model", pipeline_model, "--engines", engines, "--precision", "int8", "--tolerance",
              "max_abs_diff=0.000001")  # fmt: skip
    assert r.returncode == 1
    assert "outside the tolerance" in r.stderr and "max |score diff|" in r.stderr and "agreement" in r.stderr
    # The earlier good artifact's sidecar is untouched: nothing half-written where the daemon would look.
    assert read_sidecar(engines / RECORD).key.precision == "int8"


@pytest.mark.slow  # a build of its own
def test_corrupt_files_among_calibration_images_are_skipped_and_counted(pipeline_model: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration"
    shutil.copytree(pipeline_model / "calibration", calibration)
    (calibration / "garbage.dcm").write_bytes(b"DICM" + b"\x00" * 10)
    (calibration / "empty.png").write_bytes(b"")
    (calibration / "half.png").write_bytes((calibration / "synth-101-0000.png").read_bytes()[:200])
    r = build("--model", pipeline_model, "--engines", tmp_path / "e", "--calibration", calibration,
              "--calibration-count", "100", "--target", "onnxruntime")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "64 images from 64 files" in r.stdout and "3 skipped" in r.stdout
    assert "empty_file" in r.stdout and "corrupt_image" in r.stdout


def _model_copy(pipeline_model: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(pipeline_model, model)
    return model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "image"', 'name = "pixels"'), "the model's input is 'image' but model.toml says 'pixels'"),
        (("height = 64", "height = 128"), "input shape"),
        (('name = "logit"', 'name = "score"'), "no output named 'score'"),
        (('labels = ["lesion"]', 'labels = ["lesion", "cyst"]'), "outputs 1 scores but model.toml names 2 labels"),
        (
            ('feature = "/features/features.8/MaxPool_output_0"', 'feature = "/features/pool"'),
            "the manifest's [heatmap] cannot be added: the model has no tensor named '/features/pool'",
        ),
    ],
)
def test_a_manifest_that_does_not_match_the_graph_is_refused(
    pipeline_model: Path, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    model = _model_copy(pipeline_model, tmp_path)
    manifest = model / "model.toml"
    manifest.write_text(manifest.read_text().replace(*change))
    r = build("--model", model, "--engines", tmp_path / "e")
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e" / RECORD).exists()


def test_a_file_that_is_not_onnx_is_refused(pipeline_model: Path, tmp_path: Path) -> None:
    model = _model_copy(pipeline_model, tmp_path)
    (model / "model.onnx").write_bytes(b"not a model")
    r = build("--model", model, "--engines", tmp_path / "e")
    assert r.returncode == 2 and "is not a valid ONNX model" in r.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no image files"),
        ("few", "Only 5 usable calibration images"),
        ("all-corrupt", "Only 0 usable calibration images"),
    ],
)
def test_bad_calibration_folders_get_one_sentence(
    pipeline_model: Path, tmp_path: Path, setup: str, message: str
) -> None:
    folder = tmp_path / "cal"
    if setup != "missing":
        folder.mkdir()
    if setup == "few":
        for src in sorted((pipeline_model / "calibration").iterdir())[:5]:
            shutil.copy(src, folder)
    if setup == "all-corrupt":
        for i in range(20):
            (folder / f"x{i}.dcm").write_bytes(b"\x00" * 200)
    r = build("--model", pipeline_model, "--engines", tmp_path / "e", "--calibration", folder)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a build of its own
def test_labels_from_a_csv_file_and_refusal_without_labels_when_required(pipeline_model: Path, tmp_path: Path) -> None:
    model = _model_copy(pipeline_model, tmp_path)
    manifest = model / "model.toml"
    manifest.write_text(manifest.read_text() + "\n[accuracy]\nrequire_labels = true\n")
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["file,label"]
    for path in sorted((model / "validation").rglob("*.png")):
        shutil.copy(path, flat / path.name)
        rows.append(f"{path.name},{'lesion' if path.parent.name == 'lesion' else ''}")
    r = build("--model", model, "--engines", tmp_path / "e1", "--validation", flat, "--target", "onnxruntime")
    assert r.returncode == 2 and "requires labelled validation images" in r.stderr

    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    r = build("--model", model, "--engines", tmp_path / "e2", "--validation", flat, "--target", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert "labels from labels.csv" in r.stdout
    assert read_sidecar(tmp_path / "e2" / RECORD).gate["auc"]["lesion"]["fp32"] > 0.9


def test_an_unknown_label_folder_is_named(pipeline_model: Path, tmp_path: Path) -> None:
    validation = tmp_path / "val"
    shutil.copytree(pipeline_model / "validation", validation)
    (validation / "lesoin").mkdir()
    image = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    cv2.imwrite(str(validation / "lesoin" / "a.png"), image)
    r = build("--model", pipeline_model, "--engines", tmp_path / "e", "--validation", validation)
    assert r.returncode == 2 and "lesoin is not one of the model's labels" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_target_without_tensorrt_says_why(pipeline_model: Path, tmp_path: Path) -> None:
    r = build("--model", pipeline_model, "--engines", tmp_path / "e", "--target", "tensorrt")
    assert r.returncode == 2 and "Cannot build for --target tensorrt: TensorRT is not installed" in r.stderr


def test_sidecar_json_is_plain_and_readable(int8_engines: Path) -> None:
    raw = json.loads((int8_engines / RECORD).read_text())
    assert {"key", "gate", "throughput", "artifact", "inputs_sha256"} <= raw.keys()


@pytest.mark.slow  # a build of its own
def test_a_model_below_opset_13_is_not_quantized(pipeline_model: Path, tmp_path: Path) -> None:
    """Per-channel int8 needs QuantizeLinear's `axis`, which opset 13 brought."""
    model = _model_copy(pipeline_model, tmp_path)
    drop_heatmap(model)  # this graph has no feature maps to explain
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logit"]),
        ],
        "opset12",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch", 1])],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    (model / "model.onnx").write_bytes(onnx_model.SerializeToString())
    r = build("--model", model, "--engines", tmp_path / "e", "--precision", "int8")
    assert r.returncode == 2
    assert (
        "Per-channel int8 (QuantizeLinear with an axis) needs ONNX opset 13 or later and model.onnx uses opset 12"
        in r.stderr
    )
    # In auto, INT8 alone is skipped: FP32 needs no per-channel quantization.
    r = build("--model", model, "--engines", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    assert (
        "int8 skipped: per-channel int8" in r.stdout and read_sidecar(tmp_path / "e" / RECORD).key.precision == "fp32"
    )
