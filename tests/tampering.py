"""Faults injected into real built artifacts, shared by the unit and integration tests of the self-check."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper

from appliance.inference.artifacts import sha256_file


def alter_weights(record: Path) -> None:
    """Scale the first quantized layer's weights of the CPU model named by `record` (its sidecar) and rewrite
    the sidecar's hash to match: a key and a hash check cannot tell it from the gated artifact, only running
    it can."""
    raw = json.loads(record.read_text())
    artifact = record.parent / raw["artifact"]
    model = onnx.load(str(artifact))
    scale = next(t for t in model.graph.initializer if t.name.endswith("_scale") and "weight" in t.name.lower())
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    onnx.save(model, str(artifact))
    raw["artifact_sha256"] = sha256_file(artifact)
    record.write_text(json.dumps(raw))
