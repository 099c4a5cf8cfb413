"""Check the committed pipeline-test model with the project's own runtime (onnx, ONNX Runtime, manifest)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from synth import MEAN, SCALE, STD, auc, make_image, make_set, normalise

from appliance.domain.manifest import load_manifest

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 2  # the same held-out set train.py reports on
DEMO_SEED = 7


class CheckError(Exception):
    """A failed check, as one sentence."""


def check() -> None:
    """Raise CheckError on the first thing that is wrong; print what was measured."""
    loaded = load_manifest(HERE)
    manifest = loaded.manifest
    pre = manifest.preprocess
    # Training normalisation and the manifest must agree, or the daemon feeds the model other numbers.
    if tuple(pre.scale) != SCALE or pre.mean != [MEAN] or pre.std != [STD]:
        raise CheckError(f"model.toml normalisation {pre.scale}/{pre.mean}/{pre.std} is not what synth.py uses.")
    onnx.checker.check_model(onnx.load(str(loaded.onnx_path)), full_check=True)
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    if (inp.name, out.name) != (manifest.input.name, manifest.output.name):
        raise CheckError(f"ONNX tensors are {inp.name}/{out.name}, the manifest says otherwise.")
    print(f"onnx.checker ok; input {inp.name} {inp.shape} {inp.type}, output {out.name} {out.shape}")

    rng = np.random.default_rng(DEMO_SEED)
    demo = np.stack([make_image(rng, lesion=i % 2 == 0) for i in range(5)])
    for size in (1, 5):
        logits = session.run(None, {inp.name: normalise(demo[:size])})[0]
        if logits.shape != (size, 1) or logits.dtype != np.float32:
            raise CheckError(f"batch {size} gave {logits.shape} {logits.dtype}, expected ({size}, 1) float32.")
    probs = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
    print("batch 5 (lesion, clear, lesion, clear, lesion): " + ", ".join(f"{p:.3f}" for p in probs))
    single = session.run(None, {inp.name: normalise(demo[:1])})[0]
    if not np.allclose(single[0], logits[0], atol=1e-5):
        raise CheckError("The same image scores differently alone and in a batch of 5.")
    if not (probs[0] >= 0.5 > probs[1]):
        raise CheckError(f"The demo lesion scored {probs[0]:.3f} and the clear image {probs[1]:.3f}.")

    images, labels = make_set(HELD_OUT_SEED, 2000)
    scores = session.run(None, {inp.name: normalise(images)})[0][:, 0]
    accuracy = float(((scores >= 0.0) == (labels == 1)).mean())
    print(
        f"held-out (2000 images, seed {HELD_OUT_SEED}) on ONNX Runtime: accuracy {accuracy:.4f}, "
        f"AUC {auc(scores, labels):.4f}"
    )


def main() -> int:
    """Run the checks; one line on failure, exit 1."""
    try:
        check()
    except CheckError as e:
        print(f"check.py: {e}", file=sys.stderr)
        return 1
    print("pipeline-test model: all checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
