"""Each backend's build target is found by its registry name, and says only what differs for it."""

from __future__ import annotations

import pytest

from appliance.inference import registry
from appliance.inference.backend import BackendKind
from build_engine.target import target_for


@pytest.mark.parametrize("kind", registry.kinds(), ids=lambda kind: kind.name)
def test_every_backend_has_a_build_target_of_its_name(kind: BackendKind[object]) -> None:
    target = target_for(kind.name)
    assert target.name == kind.name and target.kind is kind
    assert target.suffix.startswith(".") and target.artifact_stem("stem", "int8").startswith("stem")
    assert all(target.refuses(precision) == "" for precision in kind.precisions)


def test_a_name_without_a_target_file_says_which_file_is_missing() -> None:
    with pytest.raises(TypeError, match=r"build_engine/targets/openvino\.py is missing"):
        target_for("openvino")


def test_a_precision_a_target_never_builds_is_refused_with_its_sentence() -> None:
    assert target_for("onnxruntime").refuses("fp16") == (
        "FP16 is not built for ONNX Runtime on the CPU (it is slower than FP32 there)."
    )
    assert target_for("tensorrt").refuses("fp16") == ""
