"""The Triton test peer itself: a repository written as for a production Triton loads through the shim backend and
answers as ONNX Runtime in-process does; it comes back after kill -9; gRPC over mutual TLS."""

from __future__ import annotations

import json
import shutil
import tomllib
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from appliance.api.certs import make_server, make_terminal
from appliance.kserve import predict_v2_pb2, predict_v2_pb2_grpc
from tests.peers.triton import Triton, needs_triton

pytestmark = [pytest.mark.slow, needs_triton]

MODEL = "pipeline-test"
SOURCE = Path(__file__).resolve().parents[2] / "models" / MODEL
MAX_BATCH = 8


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pipeline-test as Triton's onnxruntime backend takes it: config.pbtxt and 1/model.onnx."""
    manifest = tomllib.loads((SOURCE / "model.toml").read_text())
    session = ort.InferenceSession(str(SOURCE / "model.onnx"))
    (output,) = session.get_outputs()
    size = manifest["input"]
    root = tmp_path_factory.mktemp("triton-repo")
    (root / MODEL / "1").mkdir(parents=True)
    shutil.copy(SOURCE / "model.onnx", root / MODEL / "1" / "model.onnx")
    (root / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
        'default_model_filename: "model.onnx"\n'
        f'input [{{ name: "{size["name"]}" data_type: TYPE_FP32 '
        f"dims: [{size['channels']}, {size['height']}, {size['width']}] }}]\n"
        f'output [{{ name: "{output.name}" data_type: TYPE_FP32 dims: [{output.shape[1]}] }}]\n'
        "instance_group [{ kind: KIND_CPU count: 1 }]\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    )
    return root


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    with Triton(repository, [MODEL], root=tmp_path_factory.mktemp("triton")) as server:
        yield server


def infer(server: Triton, images: np.ndarray) -> np.ndarray:
    """The v2 REST protocol, JSON tensors."""
    tensor = {"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}
    body = {"inputs": [tensor]}
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/{MODEL}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (output,) = json.load(response)["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_serves_the_repository_as_onnx_runtime_does(triton: Triton) -> None:
    images = np.random.default_rng(22).random((20, 1, 64, 64), np.float32)
    expected = ort.InferenceSession(str(SOURCE / "model.onnx")).run(None, {"image": images})[0]
    before = sum(triton.batch_sizes())

    np.testing.assert_allclose(infer(triton, images[:3]), expected[:3], rtol=0, atol=1e-5)
    # Single-image requests at once: the dynamic batcher may merge them; each answer is still its own image's.
    with ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(lambda i: infer(triton, images[i : i + 1]), range(len(images))))
    np.testing.assert_allclose(np.concatenate(singles), expected, rtol=0, atol=1e-5)

    sizes = triton.batch_sizes()
    assert sum(sizes) - before == 3 + len(images)  # every row ran once, in the shim's logged batches
    assert max(sizes) <= MAX_BATCH


def test_answers_again_after_kill_and_start(triton: Triton) -> None:
    image = np.zeros((1, 1, 64, 64), np.float32)
    first = infer(triton, image)
    assert triton.stub_pids() and triton.shm_regions()
    triton.kill()
    assert not triton.running and not triton.stub_pids() and not triton.shm_regions()
    with pytest.raises(OSError):
        infer(triton, image)
    triton.start()
    np.testing.assert_array_equal(infer(triton, image), first)


def test_grpc_over_mutual_tls(repository: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_server(certs, ["localhost"], ["127.0.0.1"])
    client = make_terminal(certs, "appliance")
    server_tls = {"tls_cert": certs / "server.crt", "tls_key": certs / "server.key", "tls_client_ca": certs / "ca.crt"}
    with Triton(repository, [], root=tmp_path / "triton", **server_tls) as server:
        ca = (certs / "ca.crt").read_bytes()
        mutual = grpc.ssl_channel_credentials(
            ca, (client / "appliance.key").read_bytes(), (client / "appliance.crt").read_bytes()
        )
        with grpc.secure_channel(server.grpc_address, mutual) as channel:
            stub = predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(predict_v2_pb2.ServerReadyRequest(), timeout=10).ready
        with grpc.secure_channel(server.grpc_address, grpc.ssl_channel_credentials(ca)) as channel:
            stub = predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.ServerReady(predict_v2_pb2.ServerReadyRequest(), timeout=10)
