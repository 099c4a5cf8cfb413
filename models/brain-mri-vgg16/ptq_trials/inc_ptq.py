"""Intel Neural Compressor, ONNX flavour (onnx-neural-compressor, inc-venv).

    python inc_ptq.py static            # INC's static PTQ, the project's recipe (baseline for INC)
    python inc_ptq.py sq [ALPHA]        # SmoothQuant (Conv inputs, folded), then the same static PTQ
    (add --no-patch to run without the reduce_range fix below, as inc-sq0.5.onnx was made)
    python inc_ptq.py tune              # accuracy-aware tuning (tuning.autotune) with an eval function
                                        # that mirrors the gate's score tolerances (see eval_fn)

Every variant: Q/DQ, s8 symmetric activations, s8 symmetric per-channel weights with reduce_range (7-bit:
this AVX2 CPU has no VNNI, as the build's recipe), Conv/Gemm/MatMul only, the heatmap branch (nodes
heatmap/...) excluded so it stays float, calibrated on /work/ptq/data/calibration.npy (128 tensors, batches of 8).
Output: /work/ptq/out/inc-<variant>.onnx
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx_neural_compressor import data_reader
from onnx_neural_compressor.quantization import CalibrationMethod, QuantFormat, QuantType, quantize, tuning
from onnx_neural_compressor.quantization import config as inc_config

WORK = Path("/work/ptq")
DATA, OUT = WORK / "data", WORK / "out"
meta = json.loads((DATA / "meta.json").read_text())
FLOAT = DATA / "float.onnx"
BRANCH = (DATA / "branch_nodes.txt").read_text().split()
OPS = ["Conv", "Gemm", "MatMul"]
REDUCE_RANGE = "--no-patch" not in sys.argv


def _patch_reduce_range() -> None:
    """onnx-neural-compressor 1.0 drops reduce_range: algorithm_entry.static_quantize_entry builds its
    StaticQuantizer without it, so the weights come out full 8-bit (|q| up to 127; seen in inc-sq0.5.onnx),
    which saturates the int16 pair sums of ONNX Runtime's AVX2 kernels on this CPU. Pass it through."""
    from onnx_neural_compressor.algorithms.post_training_quant import quantizer

    original = quantizer.StaticQuantizer.__init__

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("reduce_range", True)
        original(self, *args, **kwargs)

    quantizer.StaticQuantizer.__init__ = __init__


class Reader(data_reader.CalibrationDataReader):
    def __init__(self, batch: int = 8) -> None:
        self.x = np.load(DATA / "calibration.npy")
        self.batch = batch
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter([{meta["input"]: self.x[i : i + self.batch]} for i in range(0, len(self.x), self.batch)])


def common(**kw):
    return dict(
        calibration_data_reader=Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        op_types_to_quantize=OPS,
        nodes_to_exclude=list(BRANCH),
        execution_provider="CPUExecutionProvider",
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        **kw,
    )


# --- the eval function for tuning: the gate's score figures, on validation.npy, against FP32 ----------------
_VAL = None
_REF = None
_TRIAL = 0


def _scores(model_path: str) -> np.ndarray:
    so = ort.SessionOptions()
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(_VAL), 8):
        out.append(sess.run([meta["output"]], {meta["input"]: _VAL[i : i + 8]})[0])
    return np.concatenate(out)


def eval_fn(model_path) -> float:
    """1 - max |score diff| vs FP32 (softmax scores, as the gate compares them), 0 when the mean passes
    0.015 or a decision (argmax) flips on more than 1 of the 64: INC's tolerable_loss=0.10 (relative to
    FP32's 1.0) then means max |diff| <= 0.10, the gate's own bound."""
    global _VAL, _REF
    if _VAL is None:
        _VAL = np.load(DATA / "validation.npy")
        _REF = _scores(str(FLOAT))
    s = _scores(str(model_path))
    # Keep each trial's model for gate.py. autotune's first call is FP32 itself (its ORT-optimized copy, the
    # baseline): not saved. Trial k is the k-th config of the list (min-max, percentile, percentile with the
    # head in float). The run in RESULTS.md counted the baseline as trial1: its trial2 is min-max, trial3 percentile.
    global _TRIAL
    if _TRIAL > 0:
        onnx.save(onnx.load(str(model_path)), str(OUT / f"inc-tune-trial{_TRIAL}.onnx"))
    _TRIAL += 1
    d = np.abs(s - _REF)
    flips = int((s.argmax(1) != _REF.argmax(1)).sum())
    score = 0.0 if (d.mean() > 0.015 or flips > 1) else 1.0 - float(d.max())
    print(f"eval: max {d.max():.4f} mean {d.mean():.4f} flips {flips} -> {score:.4f}", flush=True)
    return score


def main() -> None:
    variant = sys.argv[1]
    if REDUCE_RANGE:
        _patch_reduce_range()
    started = time.time()
    if variant == "static":
        out = OUT / "inc-static.onnx"
        quantize(str(FLOAT), str(out), inc_config.StaticQuantConfig(**common()))
    elif variant == "sq":
        alpha = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
        out = OUT / f"inc-sq{alpha}.onnx"
        cfg = inc_config.SmoothQuantConfig(alpha=alpha, op_types=["Conv"], folding=True, calib_iter=16, **common())
        quantize(str(FLOAT), str(out), cfg)
    elif variant == "tune":
        out = OUT / "inc-tune.onnx"
        reader = Reader()
        kw = common()
        kw.pop("calibration_data_reader")
        # onnx-neural-compressor 1.0's autotune walks a config list (no automatic op-wise fallback as in
        # neural-compressor 2.x): min-max, percentile, then percentile with the dense head (4 MatMuls) in float.
        head = [
            n.name
            for n in onnx.load(str(FLOAT), load_external_data=False).graph.node
            if n.op_type == "MatMul" and n.name not in BRANCH
        ]
        configs = [
            inc_config.StaticQuantConfig(
                calibrate_method=m, **{**kw, "nodes_to_exclude": kw["nodes_to_exclude"] + extra}
            )
            for extra, m in (
                ([], CalibrationMethod.MinMax),
                ([], CalibrationMethod.Percentile),
                (head, CalibrationMethod.Percentile),
            )
        ]
        tcfg = tuning.TuningConfig(config_set=configs, tolerable_loss=0.10, max_trials=len(configs))
        best = tuning.autotune(str(FLOAT), tcfg, eval_fn, calibration_data_reader=reader)
        if best is None:
            print("tuning found no model within the tolerance")
            return
        onnx.save(best, str(out))
    else:
        raise SystemExit(__doc__)
    print(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
