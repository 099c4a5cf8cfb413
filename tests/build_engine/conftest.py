"""Shared: a copy of the pipeline-test model with generated image sets, and builds made from it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..integration.conftest import REPO, TEST_MODEL


def build(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m build_engine` as `make engine` runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "build_engine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def drop_heatmap(model: Path) -> None:
    """Take the [heatmap] section out of a model folder's manifest: a model that declares none has none."""
    manifest = model / "model.toml"
    manifest.write_text(re.sub(r"^\[heatmap\].*?(?=^\[)", "", manifest.read_text(), flags=re.S | re.M))


def write_pipeline_sets(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("pipeline_synth", folder / "synth.py")
    assert spec is not None and spec.loader is not None
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    synth.write_sets(folder)


@pytest.fixture(scope="session")
def pipeline_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "pipeline-test"
    shutil.copytree(TEST_MODEL, folder, ignore=shutil.ignore_patterns("calibration", "validation", "__pycache__"))
    write_pipeline_sets(folder)
    return folder


# An INT8 build that passes on any CPU class. Whether INT8 meets pipeline-test's own tolerances depends on
# the host's int8 kernels (a figure); tests that need an artifact to serve, reload or refuse need only one
# that was gated, so they give tolerances of their own. test_recipes.py checks the real gate's behaviour.
# The heatmap's peaks are gated too: on images without the finding its map is nearly flat, and where its
# peak lands among near-equal cells is another figure of the kernels.
INT8 = ("--precision", "int8", "--tolerance", "min_agreement=0.9", "--tolerance", "max_abs_diff=0.3",
        "--tolerance", "mean_abs_diff=0.05", "--tolerance", "min_heatmap_agreement=0.5")  # fmt: skip


@pytest.fixture(scope="session")
def int8_engines(pipeline_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("engines")
    r = build("--model", pipeline_model, "--engines", engines, *INT8)
    assert r.returncode == 0, r.stderr
    assert "calibrating" not in r.stderr and "\r" not in r.stderr  # no progress bars where stderr is a pipe
    return engines
