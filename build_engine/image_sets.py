"""Calibration and validation images, read through the daemon's own decode and preprocessing (`Preparer`).

Files are taken in sorted order of their path in the folder, so two builds from the same folder see the
same tensors in the same order and produce the same artifact. Files the daemon would reject are skipped
and counted, with the daemon's own reason code.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.toolkit import InputRejected, Manifest, Preparer
from build_engine import progress
from build_engine.errors import BuildError

LABELS_CSV = "labels.csv"
NEGATIVE = "none"  # folder or CSV label meaning "none of the model's labels"


@dataclass
class ImageSet:
    folder: Path
    tensors: list[np.ndarray] = field(default_factory=list)
    labels: list[frozenset[str]] | None = None  # per tensor, when the folder is labelled
    files_used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    digest: str = ""
    label_note: str = ""

    def batch(self) -> np.ndarray:
        return np.stack(self.tensors)

    def describe(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{len(self.tensors)} images from {self.files_used} files in {self.folder}"
        if skipped:
            reasons = ", ".join(f"{n} {code}" for code, n in sorted(self.skipped.items()))
            text += f" ({skipped} skipped: {reasons})"
        return text


def list_files(folder: Path, what: str) -> list[Path]:
    """Every regular, non-hidden file below folder, sorted by relative path; one sentence if none."""
    if not folder.exists():
        raise BuildError(f"The {what} folder {folder} does not exist.")
    if not folder.is_dir():
        raise BuildError(f"The {what} folder {folder} is not a folder.")
    try:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
    except PermissionError as e:
        raise BuildError(f"The {what} folder {folder} is not readable ({e.strerror}).") from e
    files = [p for p in files if p.name != LABELS_CSV]
    if not files:
        raise BuildError(f"The {what} folder {folder} holds no image files.")
    return files


def read_labels(folder: Path, files: list[Path], manifest: Manifest) -> tuple[dict[Path, frozenset[str]] | None, str]:
    """Labels from folder/labels.csv (file,label) or from one sub-folder per label; None if neither."""
    known = set(manifest.output.labels) | {NEGATIVE}
    csv_path = folder / LABELS_CSV
    if csv_path.is_file():
        return _labels_from_csv(csv_path, folder, known), f"labels from {csv_path.name}"
    tops = {p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1}
    if not tops or not tops & known:
        return None, f"no labels in {folder} (one sub-folder per label, or {LABELS_CSV} with file,label)"
    unknown = sorted(tops - known) + (["(files at the top level)"] if any(p.parent == folder for p in files) else [])
    if unknown:
        raise BuildError(
            f"{folder} is labelled by sub-folder, but {', '.join(unknown)} is not one of the model's labels "
            f"({', '.join(sorted(known))})."
        )
    mapping = {p: _label_set(p.relative_to(folder).parts[0]) for p in files}
    return mapping, "labels from sub-folder names"


def _label_set(text: str) -> frozenset[str]:
    names = {t.strip() for t in text.split(";") if t.strip()}
    return frozenset(names - {NEGATIVE})


def _labels_from_csv(path: Path, folder: Path, known: set[str]) -> dict[Path, frozenset[str]]:
    mapping: dict[Path, frozenset[str]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                if "file" not in row or "label" not in row:
                    raise BuildError(f"{path} needs a header line 'file,label'.")
                labels = _label_set(row["label"] or NEGATIVE)
                unknown = labels - known
                if unknown:
                    raise BuildError(f"{path} line {n}: {', '.join(sorted(unknown))} is not one of the model's labels.")
                mapping[(folder / row["file"]).resolve()] = labels
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BuildError(f"{path} is not a readable CSV file ({e}).") from e
    return mapping


def load_set(
    folder: Path, preparer: Preparer, *, what: str, limit: int | None = None, want_labels: bool = False
) -> ImageSet:
    """Decode and preprocess up to `limit` tensors (each frame counts) in a fixed order."""
    files = list_files(folder, what)
    label_map: dict[Path, frozenset[str]] | None = None
    result = ImageSet(folder=folder)
    if want_labels:
        label_map, result.label_note = read_labels(folder, files, preparer.manifest)
        if label_map is not None and folder.joinpath(LABELS_CSV).is_file():
            files = [p for p in files if p.resolve() in label_map]
            label_map = {p: label_map[p.resolve()] for p in files}
        result.labels = [] if label_map is not None else None
    digest = hashlib.sha256()
    for path in progress.steps(files, f"reading {what} images", len(files), unit="file"):
        if limit is not None and len(result.tensors) >= limit:
            break
        rel = path.relative_to(folder).as_posix()
        try:
            data = path.read_bytes()
            prepared = preparer.prepare(data, name=rel)
        except OSError:
            result.skipped["unreadable"] += 1
            continue
        except InputRejected as e:
            result.skipped[e.code] += 1
            continue
        result.files_used += 1
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        for tensor in prepared.tensors[: None if limit is None else limit - len(result.tensors)]:
            # The tensors themselves go into the digest: a change in the daemon's decoding or
            # preprocessing code changes them, and so invalidates an artifact calibrated on the old ones.
            digest.update(np.ascontiguousarray(tensor).tobytes())
            result.tensors.append(tensor)
            if result.labels is not None and label_map is not None:
                result.labels.append(label_map[path])
    result.digest = digest.hexdigest()
    return result
