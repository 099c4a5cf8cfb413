"""The load-time self-check: an artifact reruns a few of its accuracy gate's own inputs and must give the
scores it gave when it was gated.

This catches what no key can: another kernel path on a CPU that reports the same class, a runtime or
driver upgrade, a silently broken build or an artifact altered with its hash rewritten. The inputs are
the validation images where the artifact strayed most from FP32, where a change of kernels shows first.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.files.durable import write_atomic
from appliance.inference.artifacts import SelfCheck, sha256_file
from appliance.inference.backend import Backend
from appliance.inference.postprocess import activate

COUNT = 4
# The same artifact on the same kernels reproduced its scores exactly here (1 or 2 threads, both bundled
# models); the margin is for float sums a runtime may order differently. Another kernel path moves the
# sensitive inputs by 1e-2 or more (0.17: pipeline-test's 8-bit model on AVX2's saturating kernels).
TOLERANCE = 2e-3


def most_strayed(reference: np.ndarray, scores: np.ndarray, count: int = COUNT) -> list[int]:
    """Indices of the `count` rows whose scores differ most from the reference, in their original order."""
    worst = np.abs(reference.astype(np.float64) - scores.astype(np.float64)).max(axis=1)
    return sorted(int(i) for i in np.argsort(-worst, kind="stable")[:count])


def scores_of(backend: Backend, inputs: np.ndarray, activation: str) -> np.ndarray:
    """One input a batch, as at build time: a batch's size can change which kernels run."""
    return np.concatenate([activate(backend.infer(inputs[i : i + 1]), activation) for i in range(len(inputs))])


def record(
    backend: Backend, inputs: Sequence[np.ndarray], activation: str, path: Path, tolerance: float = TOLERANCE
) -> SelfCheck:
    """Run `inputs` through the artifact as served and store both beside its sidecar."""
    stacked = np.stack(inputs)
    scores = scores_of(backend, stacked, activation)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=stacked, scores=scores)
    write_atomic(path, buffer.getvalue())
    return SelfCheck(file=path.name, sha256=sha256_file(path), count=len(stacked), tolerance=tolerance)


def verify(backend: Backend, folder: Path, check: SelfCheck | None, activation: str) -> str:
    """'' when the loaded artifact reproduces its recorded scores, else one sentence saying why not (no full stop).

    A built artifact without a self-check is refused too: every sidecar `make engine` writes carries one.
    """
    name = Path(backend.artifact).name
    if check is None:
        return f"The artifact {name} has no self-check in its sidecar; run `make engine` to rebuild it"
    path = folder / check.file
    if not path.is_file():
        return f"The self-check file {path.name} of {name} is missing; run `make engine` to rebuild it"
    if sha256_file(path) != check.sha256:
        return f"The self-check file {path.name} of {name} does not match its sidecar; run `make engine` to rebuild it"
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, expected = data["inputs"], data["scores"]
    except (OSError, ValueError, KeyError) as e:
        return f"The self-check file {path.name} of {name} is unreadable ({e}); run `make engine` to rebuild it"
    got = scores_of(backend, inputs.astype(backend.input_spec.dtype, copy=False), activation)
    if got.shape != expected.shape:
        return f"The artifact {name} gives {got.shape[1]} scores an image, its self-check recorded {expected.shape[1]}"
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    diff = np.where(np.isfinite(diff), diff, np.inf)
    worst = float(diff.max())
    if worst > check.tolerance:
        moved = int((diff.max(axis=1) > check.tolerance).sum())
        return (
            f"The artifact {name} failed its self-check: on {moved} of {len(inputs)} of its gate's images its scores "
            f"moved by up to {worst:.4f} from those recorded when it was gated (tolerance {check.tolerance}), so this "
            "host runs it differently (other kernels, runtime or driver) or the file changed; run `make engine`"
        )
    return ""
