"""AIMET for ONNX (aimet-onnx, aimet-venv): CLE, AdaRound, then Q/DQ export.

    python aimet_ptq.py NAME [--cle] [--adaround ITERS] [--adaround-nodes all|late] [--scheme min_max|tf_enhanced]
                             [--w8]

The placement mirrors the build's recipe, so the libraries' algorithms are what differs: only the data
inputs of Conv/Gemm/MatMul are quantized (every op-output quantizer is turned off here (aimet_config.json cannot: AIMET refuses is_output_quantized False in its defaults) but
script turns on those feeding a weighted op), activations int8 symmetric per tensor, weights int8
symmetric per channel, cut to 7 bits (bitwidth 7, as ONNX Runtime's reduce_range on this AVX2 CPU
without VNNI) unless --w8, biases float. (aimet-onnx 2.42 cannot export 7-bit weights: to_onnx_qdq raises
"RuntimeError: Invalid bitwidth 7; expected standard ONNX integer data types such as [U]INT{4, 8, 16, 32}",
so the runs here use --w8.) With --adaround the model is written twice: aimet-NAME.onnx (CLE/min-max only)
and aimet-NAME-adaroundITERS.onnx (AdaRound on top, from the same sim). Input: /work/ptq/data/float-noheatmap.onnx (AIMET then never
touches the heatmap branch; gate.py grafts the float branch back on) and calibration.npy (128 tensors,
batches of 8). Bias correction: aimet-onnx 2.x has no bias-correction API (only aimet-torch); CLE's
high-bias fold is part of equalize_model. Output: /work/ptq/out/aimet-NAME.onnx
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

WORK = Path("/work/ptq")
DATA, OUT = WORK / "data", WORK / "out"
HERE = Path(__file__).resolve().parent
OPS = ("Conv", "Gemm", "MatMul")
MOVES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--cle", action="store_true")
    ap.add_argument("--adaround", type=int, default=0, help="AdaRound iterations per layer (0: none)")
    ap.add_argument("--adaround-nodes", default="all", choices=["all", "late", "head"])
    ap.add_argument("--adaround-images", type=int, default=16)
    ap.add_argument("--scheme", default="min_max")
    ap.add_argument("--w8", action="store_true")
    a = ap.parse_args()

    import aimet_onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.cross_layer_equalization import equalize_model

    meta = json.loads((DATA / "meta.json").read_text())
    calib = np.load(DATA / "calibration.npy")
    batches = [{meta["input"]: calib[i : i + 8]} for i in range(0, len(calib), 8)]
    model = onnx.load(str(DATA / "float-noheatmap.onnx"))
    started = time.time()
    if a.cle:
        equalize_model(model)
        print(f"CLE done ({time.time() - started:.0f} s)", flush=True)
    weighted = [n for n in model.graph.node if n.op_type in OPS]
    data_inputs = {n.input[0] for n in weighted}
    sim = QuantizationSimModel(
        model,
        param_type="int8",
        activation_type="int8",
        quant_scheme=a.scheme,
        config_file=str(HERE / "aimet_config.json"),
        providers=["CPUExecutionProvider"],
    )
    # A data input made by a data-movement op (the input's Transpose to NCHW, the Flatten before dense_1) has
    # no quantizer of its own in AIMET: quantize the tensor that op reads instead (same values, moved).
    producers = {o: n for n in model.graph.node for o in n.output}
    wanted = set()
    for name in data_inputs:
        while name not in sim.qc_quantize_op_dict and name in producers and producers[name].op_type in MOVES:
            name = producers[name].input[0]
        wanted.add(name)
    data_inputs = wanted
    on = []
    for name, q in sim.qc_quantize_op_dict.items():
        if name in sim.param_names:
            if q.enabled and not a.w8:
                q.set_bitwidth(7)
            continue
        q.enabled = name in data_inputs
        if q.enabled:
            q.use_symmetric_encodings = True
            on.append(name)
    print(
        f"activation quantizers on: {len(on)} (weighted ops: {len(weighted)}); aimet-onnx {aimet_onnx.__version__}",
        flush=True,
    )
    t = time.time()
    sim.compute_encodings(batches)
    print(f"encodings computed ({time.time() - t:.0f} s)", flush=True)
    export(sim, a.name)
    if a.adaround:
        # The same sim, AdaRound on top: apply_adaround keeps the weight encodings just computed (overwrite=False)
        # and learns the rounding; the activation encodings are then computed again with the rounded weights.
        nodes = None
        if a.adaround_nodes == "late":  # block5's convs and the dense head: small maps, affordable on this CPU
            nodes = [n.name for n in weighted if "block5" in n.name or n.op_type != "Conv"]
        elif a.adaround_nodes == "head":  # the dense head and the last conv only: what this shared CPU affords
            nodes = [n.name for n in weighted if "block5_conv3" in n.name or n.op_type != "Conv"]
        n_img = a.adaround_images
        ada_batches = [{meta["input"]: calib[i : i + 8]} for i in range(0, n_img, 8)]
        t = time.time()
        apply_adaround(sim, ada_batches, num_iterations=a.adaround, nodes_to_include=nodes)
        print(
            f"AdaRound done ({time.time() - t:.0f} s, {a.adaround} iterations, {n_img} images, "
            f"nodes {'all' if nodes is None else nodes})",
            flush=True,
        )
        t = time.time()
        sim.compute_encodings(batches)
        print(f"encodings computed again ({time.time() - t:.0f} s)", flush=True)
        export(sim, f"{a.name}-adaround{a.adaround}")
    print(f"done in {time.time() - started:.0f} s", flush=True)


def export(sim, name: str) -> None:
    qdq = sim.to_onnx_qdq(prequantize_constants=True, force_activation_as="signed")
    out = OUT / f"aimet-{name}.onnx"
    onnx.save(qdq, str(out))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
