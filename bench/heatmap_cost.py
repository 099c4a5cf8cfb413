"""What the heatmap costs: the served artifact with and without it, at the served batch size, in one run.

The two are opened side by side and timed in turns (with, without, with, without), so a busy moment on the
host lands on both; the cost is the ratio of time per image, the median of the rounds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.toolkit import InferenceConfig, LoadedManifest, images_per_second, open_backend

ROUNDS = 3


def measure(
    loaded: LoadedManifest, chosen: InferenceConfig, engines_dir: Path, samples: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Figures for the bench's report, or why there are none (the manifest declares no heatmap)."""
    if loaded.manifest.heatmap is None:
        return {"skipped": f"{loaded.manifest.model.name} declares no [heatmap]"}
    with_map = open_backend(loaded, chosen.model_copy(update={"heatmaps": True}), engines_dir)
    try:
        without = open_backend(loaded, chosen.model_copy(update={"heatmaps": False}), engines_dir)
    except BaseException:
        with_map.close()
        raise
    try:
        if not with_map.has_heatmap:
            return {"skipped": f"{Path(with_map.artifact).name} has no heatmap (built before [heatmap]; rebuild it)"}
        if with_map.name == "tensorrt":
            # A plan runs every layer it was built with: the same plan without its heatmap copied back is no
            # measure of the cost. `make engine` on a model without [heatmap] gives the plan to compare with.
            return {"skipped": "a TensorRT plan computes its heatmap whether or not it is asked for"}
        batch = min(with_map.max_batch, without.max_batch)
        ratios, on, off = [], [], []
        for _ in range(ROUNDS):
            on.append(images_per_second(with_map, samples, batch, min_seconds=1.5))
            off.append(images_per_second(without, samples, batch, min_seconds=1.5))
            ratios.append(off[-1] / on[-1])  # time per image with / without
        return {
            "batch": batch,
            "with_img_s": float(np.median(on)),
            "without_img_s": float(np.median(off)),
            "ratio_time_with_to_without": float(np.median(ratios)),
            "ratios": ratios,
        }
    finally:
        with_map.close()
        without.close()


def text(f: dict[str, Any]) -> list[str]:
    if "heatmap" not in f:
        return []
    h = f["heatmap"]
    if "skipped" in h:
        return [f"  heatmap                skipped: {h['skipped']}"]
    rounds = ", ".join(f"{r:.3f}" for r in h["ratios"])
    return [
        f"  heatmap (in the graph) batch {h['batch']}: with {h['with_img_s']:8.1f} img/s   without "
        f"{h['without_img_s']:8.1f} img/s   (the served artifact, no I/O)",
        f"    time per image with / without {h['ratio_time_with_to_without']:.3f}   (median of rounds {rounds})",
    ]
