"""Synthetic 64x64 grayscale "lesion" / "clear" images for the pipeline-test model (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 64
# The normalisation the model was trained with; model.toml must say the same (check.py verifies it).
SCALE = (0.0, 1.0)
MEAN = 0.5
STD = 0.25


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of `sigma` pixels (in Fourier space), scaled to unit std."""
    noise = rng.standard_normal((SIZE, SIZE))
    freq = np.fft.fftfreq(SIZE)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    return field / (field.std() + 1e-12)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Tissue-like texture: coarse and fine smooth noise, a gentle intensity ramp, in raw units."""
    coarse = _smooth_noise(rng, rng.uniform(8.0, 14.0))
    fine = _smooth_noise(rng, rng.uniform(1.0, 2.5))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    ramp = rng.uniform(-0.5, 0.5) * xx + rng.uniform(-0.5, 0.5) * yy
    return 0.6 * coarse + rng.uniform(0.1, 0.4) * fine + ramp


Disc = tuple[float, float, float]  # centre row, centre column, radius, in pixels


def _add_discs(rng: np.random.Generator, raw: np.ndarray) -> tuple[np.ndarray, list[Disc]]:
    """One to three bright discs with soft (blurred) edges, of random size, place and contrast; and where."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = raw.copy()
    discs: list[Disc] = []
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(2.5, 9.0)
        cy, cx = rng.uniform(radius, SIZE - radius, size=2)
        softness = rng.uniform(0.5, 1.5)
        contrast = rng.uniform(1.5, 3.0)  # in units of the background texture's std
        dist = np.hypot(yy - cy, xx - cx)
        out += contrast / (1.0 + np.exp((dist - radius) / softness))
        discs.append((float(cy), float(cx), float(radius)))
    return out, discs


def _window(rng: np.random.Generator, raw: np.ndarray) -> np.ndarray:
    """A random display window (centre and width from the image's own percentiles) to 0..1."""
    lo_p, hi_p = rng.uniform(0.0, 10.0), rng.uniform(90.0, 100.0)
    lo, hi = np.percentile(raw, [lo_p, hi_p])
    # Widen sometimes, so not every image fills the whole display range.
    hi = hi + rng.uniform(0.0, 0.5) * (hi - lo)
    return np.clip((raw - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def make_image(rng: np.random.Generator, lesion: bool) -> np.ndarray:
    """One 64x64 image in display units 0..1 (float32), with or without lesions."""
    return make_marked_image(rng, lesion)[0]


def make_marked_image(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, list[Disc]]:
    """As make_image (the same draws, so the same image), with where its discs are: for the pointing game."""
    raw, discs = _background(rng), []
    if lesion:
        raw, discs = _add_discs(rng, raw)
    raw = raw + rng.uniform(0.05, 0.25) * rng.standard_normal(raw.shape)  # acquisition noise
    return _window(rng, raw).astype(np.float32), discs


def make_set(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images (N x 64 x 64, display units) and labels (1 = lesion), half of each, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    images = np.stack([make_image(rng, bool(y)) for y in labels])
    return images, labels.astype(np.float32)


def normalise(images: np.ndarray) -> np.ndarray:
    """Display units 0..1 -> model input N x 1 x 64 x 64, exactly as model.toml's scale/mean/std do."""
    lo, hi = SCALE
    return (((images * (hi - lo) + lo) - MEAN) / STD)[:, np.newaxis].astype(np.float32)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted as half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, np.newaxis] > neg[np.newaxis, :]).sum()
    ties = (pos[:, np.newaxis] == neg[np.newaxis, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def write_sets(model_dir: Path, calibration: int = 64, validation: int = 128) -> None:
    """16-bit PNGs for `make engine`: calibration/ (unlabelled) and validation/{lesion,none}/ (labelled).

    Seeds differ from training's, so the gate sees images the model never saw. Idempotent.
    """
    import cv2

    def write(folder: Path, seed: int, count: int, labelled: bool) -> None:
        images, labels = make_set(seed, count)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            sub = folder / ("lesion" if label else "none") if labelled else folder
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"synth-{seed}-{i:04d}.png"
            if not path.exists():
                cv2.imwrite(str(path), np.round(image * 65535).astype(np.uint16))

    write(model_dir / "calibration", 101, calibration, labelled=False)
    write(model_dir / "validation", 202, validation, labelled=True)


if __name__ == "__main__":
    write_sets(Path(__file__).resolve().parent)
