"""Step 1 (project venv): write what the PTQ libraries need, exactly as `make engine` prepares it.

/work/ptq/data/calibration.npy   the 128 calibration tensors (N x 240 x 240 x 3 float32), Builder._load_images
/work/ptq/data/validation.npy    the 64 validation-brain tensors, same preprocessing
/work/ptq/data/float.onnx        build_engine.quantize.prepare_float_model with the manifest's heatmap
                                 (what the build quantizes); its branch nodes (heatmap/...) listed in
/work/ptq/data/branch_nodes.txt  to be kept in float by every library
/work/ptq/data/float-noheatmap.onnx  the same without the heatmap branch (for libraries that choke on it)
/work/ptq/out/ort-minmax.onnx    the project's own recipe (build_engine.quantize.quantize, this host's CPU
                                 class), as the baseline row of the table
"""

from __future__ import annotations

import json

import numpy as np
from common import DATA, OUT, builder


def main() -> None:
    from build_engine.quantize import TensorReader, branch_nodes, prepare_float_model, quantize
    from build_engine.targets.onnxruntime import TARGET

    DATA.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    b = builder()
    np.save(DATA / "calibration.npy", np.stack(b.calibration.tensors).astype(np.float32))
    np.save(DATA / "validation.npy", np.stack(b.validation.tensors).astype(np.float32))
    float_model = DATA / "float.onnx"
    note = prepare_float_model(b.loaded.onnx_path, float_model, b.manifest.heatmap)
    prepare_float_model(b.loaded.onnx_path, DATA / "float-noheatmap.onnx", None)
    branch = branch_nodes(float_model, b.float_branch)
    (DATA / "branch_nodes.txt").write_text("\n".join(branch) + "\n")
    m = b.manifest
    meta = {
        "input": m.input.name,
        "output": m.output.name,
        "heatmap_output": b.float_branch,
        "heatmap_feature": m.heatmap.feature if m.heatmap else None,
        "branch_prefix": f"{b.float_branch}/",
        "prepare_note": note,
        "cpu_class": b.cpu_class,
        "recipe": TARGET.recipe(b).to_dict(),
    }
    (DATA / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1))
    print(f"{len(branch)} branch nodes kept in float")
    reader = TensorReader(m.input.name, b.calibration.tensors, batch=8)
    quantize(float_model, OUT / "ort-minmax.onnx", TARGET.recipe(b), reader, keep_float=b.float_branch)
    print("wrote", OUT / "ort-minmax.onnx")


if __name__ == "__main__":
    main()
