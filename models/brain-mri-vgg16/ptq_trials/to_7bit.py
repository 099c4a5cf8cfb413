"""Re-round a Q/DQ model's prequantized 8-bit symmetric per-channel weights to 7 bits (project venv).

    python to_7bit.py IN.onnx OUT.onnx

aimet-onnx 2.42 cannot export 7-bit weights (to_onnx_qdq: "RuntimeError: Invalid bitwidth 7; expected standard
ONNX integer data types such as [U]INT{4, 8, 16, 32}"), and 8-bit weights saturate the int16 pair sums of
ONNX Runtime's int8 kernels on this AVX2 CPU without VNNI, which ONNX Runtime's reduce_range exists to avoid.
So: for each int8 weight initializer read by a DequantizeLinear with a per-channel scale and zero point 0,
w = q8 * s8 is re-quantized as q7 = clip(round(w / s7), -64, 63) with s7 = s8 * 127 / 63 (the 7-bit scale
of the same range). This rounds twice (8 then 7 bits): AdaRound's learned rounding would not survive it,
CLE's rescaled weights do.
"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper


def main(src: str, dst: str) -> None:
    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 2:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if q.dtype != np.int8 or q.ndim < 2:
            continue  # activations are quantized at run time; only constant weights here
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if len(node.input) > 2 and node.input[2] in inits and numpy_helper.to_array(inits[node.input[2]]).any():
            raise SystemExit(f"{node.input[0]}: non-zero zero point, not symmetric")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis] = -1
        w = q.astype(np.float64) * scale.reshape(shape)
        s7 = scale * 127.0 / 63.0
        q7 = np.clip(np.round(w / s7.reshape(shape)), -64, 63).astype(np.int8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(q7, node.input[0]))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(s7.astype(np.float32), node.input[1]))
        done += 1
    onnx.save(model, dst)
    print(f"{done} weights re-rounded to 7 bits: {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
