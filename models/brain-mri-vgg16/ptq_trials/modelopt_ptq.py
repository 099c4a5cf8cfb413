"""NVIDIA ModelOpt ONNX PTQ (modelopt-venv): int8 Q/DQ, calibrated on the CPU execution provider.

    python modelopt_ptq.py max|entropy [all-ops]

Input: /work/ptq/data/float.onnx (the build's float model, heatmap branch included) and calibration.npy.
The heatmap branch (nodes named heatmap/...) is excluded by regex, so it stays float. By default only
Conv/Gemm/MatMul are quantized (the project's choice); 'all-ops' leaves ModelOpt's own op list.
Output: /work/ptq/out/modelopt-<method>[-allops].onnx
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from modelopt.onnx.quantization import quantize

WORK = Path("/work/ptq")
method = sys.argv[1] if len(sys.argv) > 1 else "max"
all_ops = "all-ops" in sys.argv[2:]
meta = json.loads((WORK / "data/meta.json").read_text())
calib = np.load(WORK / "data/calibration.npy")
out = WORK / "out" / f"modelopt-{method}{'-allops' if all_ops else ''}.onnx"
started = time.time()
quantize(
    str(WORK / "data/float.onnx"),
    quantize_mode="int8",
    calibration_data={meta["input"]: calib},
    calibration_method=method,
    calibration_eps=["cpu"],
    op_types_to_quantize=None if all_ops else ["Conv", "Gemm", "MatMul"],
    nodes_to_exclude=[r"heatmap/.*"],
    high_precision_dtype="fp32",
    output_path=str(out),
    log_level="INFO",
)
print(f"wrote {out} in {time.time() - started:.0f} s")
