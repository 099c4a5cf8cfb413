"""Step 3 (project venv): gate each Q/DQ model with the project's own gate, as `make engine` does.

    python gate.py /work/ptq/out/*.onnx            # writes /work/ptq/out/gate-results.json (and prints a table)

For each file: Builder._make_and_gate on the ONNX Runtime CPU target (its make() serves the ONNX as is), i.e.
the FP32 reference and the candidate run through the daemon's ONNX Runtime backend on validation-brain/
(64 images, preprocessed by Builder._load_images), compared by build_engine.gate.compare with model.toml's
[accuracy] tolerances (never widened here). Then the speed, images/s at batch 8 (images_per_second on one
validation image, as _faster_of measures it), the candidate and FP32 measured one after the other in this run.

A model that lacks the `heatmap` output (a library dropped or renamed the branch) gets the float branch of
/work/ptq/data/float.onnx grafted back on (graft_heatmap below), reading the quantized model's own forward
tensors, exactly what prepare_float_model + keeping the branch in float gives; the report says so.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import onnx
from common import DATA, OUT, builder


def graft_heatmap(path: Path, float_model: Path, output: str) -> tuple[Path, str]:
    """`path` itself if it has the heatmap output, else a copy with the float branch grafted on ('' or a note)."""
    model = onnx.load(str(path))
    if any(o.name == output for o in model.graph.output):
        return path, ""
    ref = onnx.load(str(float_model))
    prefix = f"{output}/"
    nodes = [n for n in ref.graph.node if n.name.startswith(prefix)]
    made = {o for n in nodes for o in n.output}
    inits = {i.name: i for i in ref.graph.initializer}
    needs = {i for n in nodes for i in n.input if i and i not in made}
    have = {t for n in model.graph.node for t in n.output} | {i.name for i in model.graph.input}
    have_inits = {i.name for i in model.graph.initializer}
    missing = sorted(t for t in needs if t not in have and t not in inits and t not in have_inits)
    if missing:
        raise RuntimeError(f"cannot graft the heatmap branch: the quantized model lacks {missing}")
    for name in sorted(needs):
        if name in inits and name not in have and name not in have_inits:
            model.graph.initializer.append(inits[name])
    model.graph.node.extend(nodes)
    model.graph.output.extend([o for o in ref.graph.output if o.name == output])
    grafted = path.with_name(path.stem + ".grafted.onnx")
    onnx.save(model, str(grafted))
    return grafted, f"heatmap branch ({len(nodes)} float nodes) grafted back from float.onnx"


def count_qdq(path: Path) -> dict[str, int]:
    g = onnx.load(str(path), load_external_data=False).graph
    out: dict[str, int] = {}
    for n in g.node:
        if n.op_type in (
            "QuantizeLinear",
            "DequantizeLinear",
            "QLinearConv",
            "QLinearMatMul",
            "ConvInteger",
            "MatMulInteger",
        ):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def main(paths: list[str]) -> None:
    from appliance.inference.runs import images_per_second
    from build_engine.targets.onnxruntime import TARGET

    b = builder()
    b._fp32_reference()
    results_path = OUT / "gate-results.json"
    sample = b.validation.tensors[:1]
    with tempfile.TemporaryDirectory() as tmp:
        for p in map(Path, paths):
            if p.name.endswith(".grafted.onnx"):
                continue
            started = time.time()
            entry: dict = {"file": str(p)}
            try:
                artifact, note = graft_heatmap(p, DATA / "float.onnx", b.float_branch)
                entry["heatmap"] = note or "built in by the library run (branch kept in float)"
                entry["qdq_ops"] = count_qdq(artifact)
                attempt = b._make_and_gate(TARGET, "int8", artifact, Path(tmp))
                r = attempt.report
                entry.update(r.to_dict())
                entry["summary"] = r.summary()
                with b._open(registry_kind(), artifact) as cand, b._open(registry_ref(), b.loaded.onnx_path) as fp32:
                    s_fp32 = images_per_second(fp32, sample)
                    s_cand = images_per_second(cand, sample)
                    s_fp32b = images_per_second(fp32, sample)
                entry["speed"] = {
                    "batch": b.facts.max_batch,
                    "fp32_img_s": [s_fp32, s_fp32b],
                    "int8_img_s": s_cand,
                    "ratio": s_cand / ((s_fp32 + s_fp32b) / 2),
                }
                status = "PASSED" if r.passed else "FAILED: " + "; ".join(r.failures)
                print(
                    f"{p.name}: {r.summary()} -> {status}; speed {s_cand:.2f} img/s vs FP32 "
                    f"{s_fp32:.2f}/{s_fp32b:.2f} ({entry['speed']['ratio']:.2f}x)",
                    flush=True,
                )
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
                print(f"{p.name}: ERROR {entry['error']}", flush=True)
            entry["seconds"] = round(time.time() - started, 1)
            # Read again just before writing: several gate.py runs may share the file.
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            results[p.name] = entry
            results_path.write_text(json.dumps(results, indent=1, default=str))


def registry_kind():
    from build_engine.targets.onnxruntime import TARGET

    return TARGET.kind


def registry_ref():
    from appliance.inference import registry

    return registry.reference()


if __name__ == "__main__":
    main(sys.argv[1:])
