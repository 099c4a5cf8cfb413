"""inference.build_on_start: a daemon started on a bare engines folder serves FP32 at once, builds and gates the
quantized artifact in a background process, and swaps it in with no failed request; a failed gate is said and
not tried again at the next start."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import onnx
import pytest

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import TEST_MODEL, free_port, png_bytes
from tests.waiting import eventually

pytestmark = pytest.mark.slow

# Whether pipeline-test's INT8 meets its own tolerances is a figure of the host's int8 kernels (AVX2 or VNNI);
# the swap test needs one that passes on both, as tests/build_engine/conftest.py's INT8 builds do.
ANY_CPU = "\n".join(
    (
        "min_agreement = 0.9",
        "max_abs_diff = 0.3",
        "mean_abs_diff = 0.05",
        "max_auc_drop = 0.05",
        "min_heatmap_agreement = 0.5",
    )
)

# Scored while the build runs: a clinic's steady trickle, which leaves the build the idle CPU it runs on.
PAUSE_S = 0.05


def _model(tmp_path: Path, accuracy: str = "") -> Path:
    model = tmp_path / "model"
    shutil.copytree(TEST_MODEL, model)
    if accuracy:
        (model / "model.toml").write_text((model / "model.toml").read_text() + f"\n[accuracy]\n{accuracy}\n")
    return model


def _inference(precision: str) -> dict[str, object]:
    return {"threads": 1, "decode_workers": 2, "build_on_start": True, "build_precision": precision}


def _metric(port: int, name: str) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return " ".join(line for line in text.splitlines() if line.startswith(name))


def test_a_bare_engines_folder_serves_fp32_builds_and_swaps_in_int8_with_no_failed_request(
    make_daemon: type, tmp_path: Path
) -> None:
    engines, metrics = tmp_path / "engines", free_port()
    d = make_daemon(model=_model(tmp_path, accuracy=ANY_CPU), inference=_inference("int8"),
                    server={"metrics_port": metrics, "score_rate_per_terminal": 1000.0})  # fmt: skip
    d.overrides["model"] = {"engines_dir": engines}  # beside the model's folder the config names
    d.start()
    first = d.status()
    assert first.model.precision == "fp32"
    assert "building the quantized artifact for this host in the background" in first.engine_build
    assert "no quantized CPU model" in first.engine_build

    swapped = threading.Event()
    results: list[pb.Result] = []
    errors: list[str] = []

    def score(worker: int) -> None:
        with d.channel() as ch:
            stub = pb_grpc.ScoringStub(ch)
            i, after = 0, 0
            while after < 5:  # until a few answers came after the swap
                try:
                    results.append(stub.Score(pb.ScoreRequest(image=png_bytes(50_000 + 1000 * worker + i)), timeout=60))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                i += 1
                after += swapped.is_set()
                time.sleep(PAUSE_S)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(score, w) for w in range(2)]
        eventually(d.status, "the built artifact swapped in", until=lambda s: "swapped in" in s.engine_build,
                   timeout=240, every=0.5, context=lambda: d.log()[-4000:])  # fmt: skip
        swapped.set()
        for r in running:
            r.result(timeout=120)

    assert not errors, errors[:3]
    assert len(results) >= 10 and all(r.outcome == pb.OUTCOME_SCORED for r in results)
    status = d.status()
    assert (status.model.precision, status.model_generation) == ("int8", 1)
    assert "built in the background" in status.engine_build and "on onnxruntime int8" in status.engine_build
    assert 'appliance_engine_build{state="swapped"} 1.0' in _metric(metrics, 'appliance_engine_build{state="swapped"}')
    assert (engines / "pipeline-test").is_dir() and not list((engines / "pipeline-test").glob(".build-*"))
    log = d.log()
    assert "background build:" in log and "swapped in" in log

    assert d.stop() == 0  # the next start serves the gated artifact at once and builds nothing
    d.start()
    again = d.status()
    assert (again.model.precision, again.engine_build) == ("int8", "")
    assert d.log().count("background build:") == 1


def test_a_failed_gate_is_said_and_not_tried_again_until_the_model_changes(make_daemon: type, tmp_path: Path) -> None:
    # A copy of the test model held to a tolerance its INT8 cannot meet (a test model's figure, not a product's).
    model = _model(tmp_path, accuracy="max_abs_diff = 0.0001")
    d = make_daemon(model=model, inference=_inference("int8"))
    d.overrides["model"] = {"engines_dir": tmp_path / "engines"}
    d.start()
    eventually(d.status, "the failed gate said", until=lambda s: "no quantized model here" in s.engine_build,
               timeout=240, every=0.5, context=lambda: d.log()[-4000:])  # fmt: skip
    status = d.status()
    assert status.model.precision == "fp32" and status.model_generation == 0
    assert "outside the tolerance" in status.engine_build and "not tried again" in status.engine_build
    assert d.stop() == 0

    d.start()  # the same model on the same host: the record says why, and no build runs
    assert "no quantized model here" in d.status().engine_build
    assert d.log().count("background build:") == 1

    assert d.stop() == 0  # another ONNX file: built and gated again
    graph = onnx.load(model / "model.onnx")
    graph.doc_string = "retrained"
    onnx.save(graph, model / "model.onnx")
    d.start()
    assert "building the quantized artifact" in d.status().engine_build
    assert d.log().count("background build:") == 2
