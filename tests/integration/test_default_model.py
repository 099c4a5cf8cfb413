"""The bundled default model (VGG16 brain MRI) served by the real daemon on real MR DICOM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from appliance.v1 import scoring_pb2 as pb

from .conftest import DEFAULT_MODEL

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
FILES = ["MR_small.dcm", "MR2_J2KR.dcm", "emri_small_jpeg_ls_lossless.dcm"]  # 1 + 1 + 10 frames

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.onnx").is_file(), reason="run `make model` to fetch the default model"
)


def _decision_holds(r: pb.Result) -> None:
    scores = np.array([s.score for s in r.scores])
    assert [s.label for s in r.scores] == LABELS
    assert scores.sum() == pytest.approx(1.0, abs=1e-4)  # the graph's softmax, passed through untouched
    top = LABELS[int(scores.argmax())]
    assert list(r.findings) == [top]
    if scores.max() < r.threshold:
        assert r.decision == pb.DECISION_INDETERMINATE
    else:
        assert r.decision == (pb.DECISION_NEGATIVE if top == "notumor" else pb.DECISION_POSITIVE)


def test_default_model_scores_real_mr_the_same_in_the_daemon_and_offline(make_daemon) -> None:
    d = make_daemon(model=DEFAULT_MODEL)
    d.start()
    paths = []
    for name in FILES:
        src = get_testdata_file(name, download=False)
        assert src is not None
        shutil.copy(str(src), d.incoming / name)
        paths.append(str(src))
    results = d.collect(12, timeout=180)
    assert sorted({r.file_name for r in results}) == sorted(FILES)
    for r in results:
        assert r.outcome == pb.OUTCOME_SCORED and r.model_name == "brain-mri-vgg16"
        _decision_holds(r)

    offline = subprocess.run(
        # The daemon's own config: the same (absent) engines folder, so both serve the FP32 ONNX.
        [sys.executable, "-m", "appliance.app.cli", "score", "--config", str(d.config_path), *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert offline.returncode == 0, offline.stderr
    rows = [json.loads(line) for line in offline.stdout.splitlines()]
    assert len(rows) == 12
    daemon_scores = {(r.file_name, r.frame_index): [s.score for s in r.scores] for r in results}
    for row in rows:
        key = (row["file_name"], row.get("frame_index", 0))
        assert [s["score"] for s in row["scores"]] == pytest.approx(daemon_scores[key], abs=1e-5)
