"""Shared by the PTQ trial scripts run in the project's venv (export.py, gate.py): the Builder the way
`make engine` sets it up for the default model, on the ONNX Runtime CPU target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE.parent  # models/brain-mri-vgg16
WORK = Path(os.environ.get("PTQ_WORK", "/work/ptq"))  # outputs (npy, onnx), never committed
DATA, OUT = WORK / "data", WORK / "out"


def builder(engines_dir: Path | None = None):
    """A Builder for the model with the manifest's defaults, its model checked and images loaded (as run())."""
    from build_engine.build import Builder, BuildOptions
    from build_engine.model_check import check_model

    engines = engines_dir or Path(tempfile.mkdtemp(prefix="ptq-engines-"))
    b = Builder(BuildOptions(model_dir=MODEL_DIR, engines_dir=engines), out=lambda s: print(s, flush=True))
    b.facts = check_model(b.loaded, b.o.max_batch or b.manifest.batching.max_batch)
    b._load_images()
    return b
