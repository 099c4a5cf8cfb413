"""Train the tiny pipeline-test CNN on synthetic images and export it to model.onnx (deterministic).

Not run by `make`: the exported model.onnx is committed. Retrain by hand, in a throwaway virtualenv
(never the project's), because PyTorch is not a project dependency:

    python3 -m venv /tmp/trainenv
    /tmp/trainenv/bin/pip install torch==2.13.0 numpy onnx
    /tmp/trainenv/bin/python models/pipeline-test/train.py

then check the result with the project's own runtime: `.venv/bin/python models/pipeline-test/check.py`.
Requirements: Python 3.11, torch 2.13.0 (CPU is enough), numpy, onnx. About a minute on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from synth import auc, make_set, normalise
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 20240601
TRAIN_SEED, HELD_OUT_SEED = 1, 2  # different generator seeds: the held-out images are never trained on
OPSET = 17
THREADS = 2


class TinyCNN(nn.Module):
    """Three conv-relu-pool blocks, global average pool, one linear layer to a single logit."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_deterministic() -> None:
    """Fix every seed and pin the thread count, so the same torch version gives the same bytes."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    # How float sums are split depends on the thread count, so it is fixed rather than taken from
    # the machine: two threads (this box's cores) keep training near a minute.
    torch.set_num_threads(THREADS)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Adam on BCE-with-logits, fixed shuffling, cosine learning-rate decay."""
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    steps_per_epoch = (len(x) + 63) // 64
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs * steps_per_epoch)
    loss_fn = nn.BCEWithLogitsLoss()
    order_rng = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=order_rng)
        total = 0.0
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            optimiser.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")


def export(model: nn.Module, path: Path) -> None:
    """Export opset 17, input `image` N x 1 x 64 x 64, output `logit` N x 1, dynamic batch axis."""
    model.eval()
    example = torch.zeros(1, 1, 64, 64)
    tmp = path.with_suffix(".onnx.tmp")
    # The TorchScript exporter (dynamo=False) writes opset 17 directly and needs no onnxscript; its
    # deprecation notice is expected, so it is not printed.
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    try:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logit"],
            dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        os.replace(tmp, path)  # the committed file is replaced only by a checked one
    finally:
        tmp.unlink(missing_ok=True)


def main() -> int:
    """Generate data, train, report held-out accuracy and AUC, export."""
    parser = argparse.ArgumentParser(description="Train and export the pipeline-test model.")
    parser.add_argument("--train", type=int, default=6000, help="Training images (half lesion).")
    parser.add_argument("--held-out", type=int, default=2000, help="Held-out images (half lesion).")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = parser.parse_args()
    make_deterministic()
    started = time.perf_counter()
    images, labels = make_set(TRAIN_SEED, args.train)
    model = TinyCNN()
    train(model, torch.from_numpy(normalise(images)), torch.from_numpy(labels), args.epochs)
    held_images, held_labels = make_set(HELD_OUT_SEED, args.held_out)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(normalise(held_images))).squeeze(1).numpy()
    accuracy = float(((logits >= 0.0) == (held_labels == 1)).mean())  # logit 0 is probability 0.5
    print(
        f"held-out ({args.held_out} images, seed {HELD_OUT_SEED}): accuracy {accuracy:.4f}, "
        f"AUC {auc(logits, held_labels):.4f}"
    )
    export(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest[:16]}...) "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
