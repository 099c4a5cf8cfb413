"""Config and manifest validation: defaults that work, one clear sentence for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Config, load_config
from appliance.domain.errors import ConfigError, ManifestError, ModelMissingError
from appliance.domain.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


def test_repo_config_loads_and_resolves_paths_from_its_folder() -> None:
    config = load_config(REPO / "appliance.toml")
    assert config.watch.dir == REPO / "var" / "incoming"
    assert config.model.dir == REPO / "models" / "brain-mri-vgg16"
    assert config.server.port == 50051


def test_defaults_need_no_file() -> None:
    assert Config().watch.after_scoring == "move"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[watch]\ndirr = 'x'\n", "watch.dirr"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[watch]\nafter_scoring = 'archive'\n", "watch.after_scoring"),
        ("[nonsense]\n", "nonsense"),
        ("[watch\n", "not valid TOML"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert needle in err.value.message and str(cfg) in err.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["brain-mri-vgg16", "pipeline-test"])
def test_bundled_manifests_are_valid(name: str) -> None:
    loaded = load_manifest(REPO / "models" / name, require_onnx=False)
    assert loaded.manifest.output.labels


def test_manifest_mistakes(tmp_path: Path) -> None:
    (tmp_path / "model.toml").write_text(
        "[model]\nname='m'\nversion='1'\n[input]\nname='x'\nheight=8\nwidth=8\nchannels=3\n"
        "[output]\nname='y'\nlabels=['a']\n[preprocess]\nmean=[0.1, 0.2]\n"
    )
    with pytest.raises(ManifestError, match="mean needs 1 or 3 values"):
        load_manifest(tmp_path)
    (tmp_path / "model.toml").write_text(
        "[model]\nname='m'\nversion='1'\n[input]\nname='x'\nheight=8\nwidth=8\n[output]\nname='y'\nlabels=['a']\n"
    )
    with pytest.raises(ModelMissingError, match="make model"):
        load_manifest(tmp_path)
