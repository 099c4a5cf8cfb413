"""A Python-based Triton backend named `onnxruntime`: serves a repository's ONNX models with ONNX Runtime on the CPU.

The test server's wheel has only Triton's python backend; a production Triton has the onnxruntime backend. With this
file as `<backend-directory>/onnxruntime/model.py`, a model whose config says `platform: "onnxruntime_onnx"` loads
unchanged. Not part of the appliance: the test peer (tests/peers/triton.py) assembles it into the server.
"""

import json
import os
import sys

# The backend stub ignores PYTHONPATH and puts its base interpreter's site-packages first, where numpy may be 2
# (whose arrays this stub turns into empty outputs): the peer's virtualenv must come first.
_SITE = os.environ.get("APPLIANCE_TRITON_SITE")
if _SITE:
    sys.path.insert(0, _SITE)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list) -> list:
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        if not self.batched:
            pb_utils.Logger.log_info(f"shim batch {len(requests)}")
            return [self._response(self.session.run(self.outputs, feed)) for feed in feeds]
        # Dynamic batching hands several requests at once: one run over their rows, the rows split back.
        sizes = [len(feed[self.inputs[0]]) for feed in feeds]
        merged = {n: np.concatenate([feed[n] for feed in feeds]) for n in self.inputs}
        pb_utils.Logger.log_info(f"shim batch {sum(sizes)}")
        results = self.session.run(self.outputs, merged)
        bounds = np.cumsum(sizes)[:-1]
        split = [np.split(result, bounds) for result in results]
        return [self._response([parts[i] for parts in split]) for i in range(len(requests))]

    def _response(self, arrays: list) -> object:
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, arrays, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)
