"""`appliance score --heatmap --overlays`, run in-process on the real pipeline-test model: stdout stays one JSON
object per result, the grid goes to stderr, and each scored frame gets an overlay at its image's size that is
hottest on the finding."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from appliance.app.cli import main

TEST_MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"
DISC_X, DISC_Y, DISC_R = 150.0, 50.0, 18.0  # in the file's pixels
WIDTH, HEIGHT = 200, 150  # not square: the model letterboxes it


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() sets the daemon's logging up on the root logger; the tests after this one keep pytest's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def disc_png(path: Path) -> Path:
    """Textured background with one bright soft-edged disc, as pipeline-test was trained to find."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float64)
    background = cv2.GaussianBlur(rng.normal(0.0, 1.0, (HEIGHT, WIDTH)), (0, 0), 4.0)
    image = 0.35 + 0.05 * background / background.std()
    image += 0.5 / (1.0 + np.exp((np.hypot(yy - DISC_Y, xx - DISC_X) - DISC_R) / 2.0))
    cv2.imwrite(str(path), np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    return path


def chroma(rgb: np.ndarray) -> np.ndarray:
    """How far each pixel is from gray: zero wherever the overlay left the image as it was."""
    return (rgb.max(axis=2).astype(np.int32) - rgb.min(axis=2)).astype(np.float64)


def test_overlay_and_grid_for_a_disc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = disc_png(tmp_path / "disc.png")
    out = tmp_path / "overlays"

    rc = main(["score", "--model", str(TEST_MODEL), "--heatmap", "--overlays", str(out), str(image)])

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (line,) = captured.out.splitlines()  # stdout: one JSON object per result, as without --heatmap
    result = json.loads(line)
    assert result["decision"] == "DECISION_POSITIVE"
    assert result["heatmap"]["label"] == "lesion" and result["heatmap"]["method"] == "cam"
    assert "disc.png: looked at (" in captured.err and f"of its {WIDTH} x {HEIGHT} pixels for lesion" in captured.err
    grid = [ln.split() for ln in captured.err.splitlines() if ln.startswith("  ")]
    assert len(grid) == 8 and all(len(row) == 8 for row in grid)
    assert sum(row.count("9") for row in grid) >= 1

    overlay = cv2.imread(str(out / "disc.png"))
    assert overlay is not None and overlay.shape == (HEIGHT, WIDTH, 3)
    tint = chroma(overlay)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    centre_x, centre_y = (tint * xx).sum() / tint.sum(), (tint * yy).sum() / tint.sum()
    assert np.hypot(centre_x - DISC_X, centre_y - DISC_Y) <= DISC_R
    assert tint[HEIGHT - 20 :, : WIDTH // 3].max() == 0  # the far corner is the image, untinted


def test_a_multi_frame_file_gets_one_overlay_per_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = get_testdata_file("emri_small.dcm", download=False)  # 10 frames of 64 x 64 MR
    assert source is not None
    out = tmp_path / "overlays"

    rc = main(["score", "--model", str(TEST_MODEL), "--overlays", str(out), str(source)])

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(captured.out.splitlines()) == 10
    assert sorted(p.name for p in out.iterdir()) == sorted(f"emri_small-frame{n}.png" for n in range(1, 11))
    assert all(cv2.imread(str(p)).shape == (64, 64, 3) for p in out.iterdir())


def test_heatmaps_turned_off_are_named_as_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = disc_png(tmp_path / "disc.png")
    config = tmp_path / "appliance.toml"
    config.write_text(f'[model]\ndir = "{TEST_MODEL}"\n\n[inference]\nheatmaps = false\n')
    out = tmp_path / "overlays"

    rc = main(["score", "--config", str(config), "--heatmap", "--overlays", str(out), str(image)])

    captured = capsys.readouterr()
    assert rc == 1  # an overlay was asked for and none could be made
    assert "heatmap" not in json.loads(captured.out)
    assert "disc.png: no heatmap: heatmaps are turned off (inference.heatmaps = false)" in captured.err
    assert "no overlay for disc.png: heatmaps are turned off" in captured.err
    assert not list(out.iterdir())


def test_a_rejected_file_gets_no_overlay_and_no_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "overlays"

    rc = main(["score", "--model", str(TEST_MODEL), "--heatmap", "--overlays", str(out), str(bad)])

    captured = capsys.readouterr()
    assert rc == 1
    assert json.loads(captured.out)["outcome"] == "OUTCOME_REJECTED"
    assert "looked at" not in captured.err and "no overlay" not in captured.err
    assert not list(out.iterdir())
