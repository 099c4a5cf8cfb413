"""A wrong config or a model that doesn't match its manifest stops the start with one clear sentence."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import TEST_MODEL


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.app.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[watch]\ndirr = "x"\n')
    r = _run(cfg)
    assert r.returncode == 2
    assert "watch.dirr" in r.stderr and "Extra inputs are not permitted" in r.stderr


def test_missing_watch_folder_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[watch]\ndir = "{tmp_path / "nope"}"\n[model]\ndir = "{TEST_MODEL}"\n')
    r = _run(cfg)
    assert r.returncode == 2
    assert "watch folder" in r.stderr and "does not exist" in r.stderr


def test_model_that_does_not_match_its_manifest(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TEST_MODEL, model)
    manifest = model / "model.toml"
    manifest.write_text(manifest.read_text().replace("height = 64", "height = 128"))
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[watch]\ndir = "{tmp_path / "in"}"\n[model]\ndir = "{model}"\n[server]\nmetrics_port = 0\n')
    r = _run(cfg)
    assert r.returncode == 2
    assert "input shape" in r.stderr and "model.toml" in r.stderr


def test_a_grpc_port_already_taken_is_refused_not_shared(tmp_path: Path) -> None:
    """grpc binds with SO_REUSEPORT unless told not to: another process on the port would take half the
    terminals' connections without a word."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another grpc server would bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "in").mkdir()
        cfg = tmp_path / "a.toml"
        cfg.write_text(
            f'[watch]\ndir = "{tmp_path / "in"}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[model]\ndir = "{TEST_MODEL}"\n[server]\nport = {port}\nmetrics_port = 0\n'
        )
        r = _run(cfg)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"Cannot listen on 127.0.0.1:{port}" in r.stderr
