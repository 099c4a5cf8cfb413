"""Synthetic CT series for the series tests: slices made of models/pipeline-test's own synthetic images
(synth.py), with the model's bright disc on the slices asked for and on no other, as a scanner's DICOM files."""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

MODEL = Path(__file__).resolve().parents[1] / "models" / "pipeline-test"
SEED = 2121  # training used seed 1, the build's sets 101 and 202, check.py 2 and 7, test_heatmaps 4242
# The model is no perfect judge of synth.py's images (about one in ten either way is wrong): a slice keeps only
# an image it scores well clear of its threshold (0.5) the right way, so every slice's decision is known.
POSITIVE_ABOVE, NEGATIVE_BELOW = 0.9, 0.1
HU_SPAN = 1000  # display units 0..1 stored as 0..1000, windowed back by its VOI (centre 500, width 1000)


@dataclass(frozen=True)
class Series:
    """One series as files: its UIDs, and each slice's SOP Instance UID in slice order."""

    study_uid: str
    series_uid: str
    files: list[Path]
    sop_uids: list[str]
    marked: frozenset[str] = field(default_factory=frozenset)  # the slices with the disc (SOP Instance UIDs)


@cache
def pipeline_synth() -> ModuleType:
    """models/pipeline-test/synth.py, the generator of its images, loaded once."""
    spec = importlib.util.spec_from_file_location("pipeline_synth", MODEL / "synth.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL / "model.onnx"), providers=["CPUExecutionProvider"])


def _score(image: np.ndarray) -> float:
    logit = _session().run(None, {"image": pipeline_synth().normalise(image[np.newaxis])})[0]
    return float(1.0 / (1.0 + np.exp(-float(np.ravel(logit)[0]))))


def _clear(lesion: bool, seed: int) -> Iterator[np.ndarray]:
    """synth.py's images with (or without) discs, one draw after another, that the model scores clearly so."""
    synth = pipeline_synth()
    rng = np.random.default_rng([seed, int(lesion)])
    while True:
        image = synth.make_image(rng, lesion)
        score = _score(image)
        if (score > POSITIVE_ABOVE) if lesion else (score < NEGATIVE_BELOW):
            yield image


def ct_series(
    folder: Path,
    slices: int,
    marked: Collection[int] = (),
    *,
    side: int = 128,
    study_uid: str | None = None,
    seed: int = SEED,
    first_number: int = 1,
    series_uid: str | None = None,
) -> Series:
    """``slices`` axial CT slices of one new series (CT_small's header, ``side`` pixels square, 16-bit), written
    to ``folder`` as ct0001.dcm...; the slices numbered in ``marked`` (0-based) show the disc the model finds.
    ``series_uid`` and ``first_number`` add slices to a series made before (a late slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    study_uid = study_uid or str(generate_uid())
    series_uid = series_uid or str(generate_uid())
    frame_of_reference = str(generate_uid(entropy_srcs=[series_uid, "frame of reference"]))
    positives, negatives = _clear(True, seed), _clear(False, seed + first_number)
    scale = side // pipeline_synth().SIZE
    files, uids, marks = [], [], set()
    for index in range(slices):
        number = first_number + index
        image = next(positives if index in marked else negatives)
        # Each pixel repeated scale x scale: the daemon's area shrink to the model's 64 px gives it back exactly.
        pixels = np.kron(np.round(image * HU_SPAN), np.ones((scale, scale))).astype(np.int16)
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-64.0, -64.0, -2.5 * number]
        ds.SliceLocation = -2.5 * number
        ds.Rows = ds.Columns = side
        ds.PixelData = pixels.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = HU_SPAN // 2, HU_SPAN
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)  # CT_small's own, not these pixels'
        path = folder / f"ct{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(str(ds.SOPInstanceUID))
        if index in marked:
            marks.add(str(ds.SOPInstanceUID))
    return Series(study_uid, series_uid, files, uids, frozenset(marks))


def multi_frame(path: Path) -> tuple[str, str, int]:
    """pydicom's Enhanced MR (emri_small: 64 x 64, several frames) as an instance of a new study and series;
    its series UID, SOP Instance UID and number of frames."""
    ds = pydicom.dcmread(str(get_testdata_file("emri_small.dcm", download=False)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), int(ds.NumberOfFrames)
