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


# --- output.codes: a label's concept in the DICOM reports ----------------------------------------

_CODED = "[model]\nname='m'\nversion='1'\n[input]\nname='x'\nheight=8\nwidth=8\n[output]\nname='y'\nlabels=['a','b']\n"


def _codes(tmp_path: Path, codes: str) -> dict[str, tuple[str, str, str]]:
    (tmp_path / "model.toml").write_text(_CODED + f"codes = {codes}\n")
    manifest = load_manifest(tmp_path, require_onnx=False).manifest
    return {label: (c.scheme, c.value, c.meaning) for label, c in manifest.output.codes.items()}


def test_manifest_codes_are_looked_up_in_pydicoms_code_dictionary(tmp_path: Path) -> None:
    assert _codes(tmp_path, "{ a = 'SCT:52988006', b = 'DCM:Present' }") == {
        "a": ("SCT", "52988006", "Lesion"),
        "b": ("DCM", "121053", "Present"),
    }
    assert _codes(tmp_path, "{ a = 'SCT:Lesion' }") == {"a": ("SCT", "52988006", "Lesion")}
    # A code pydicom does not hold is taken only in full.
    given = "{ a = { scheme = 'SCT', value = '999999999', meaning = 'Not a real code (test)' } }"
    assert _codes(tmp_path, given) == {"a": ("SCT", "999999999", "Not a real code (test)")}
    assert _codes(tmp_path, "{}") == {}
    bundled = load_manifest(REPO / "models" / "pipeline-test", require_onnx=False).manifest
    assert bundled.output.codes["lesion"].model_dump() == {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}


@pytest.mark.parametrize(
    ("codes", "needle"),
    [
        ("{ a = 'SCT:999999999' }", "'SCT:999999999' is not in pydicom's code dictionary"),
        ("{ a = 'Lesion' }", "'Lesion' is not in pydicom's code dictionary"),
        ("{ a = 'XYZ:Lesion' }", "'XYZ:Lesion' is not in pydicom's code dictionary"),
        ("{ c = 'SCT:Lesion' }", "output.codes names labels the model does not have: ['c']"),
        (
            "{ a = { scheme = '99MINE', value = '1', meaning = 'x' } }",
            "the coding scheme '99MINE' is not one pydicom knows",
        ),
        ("{ a = { scheme = 'SCT', value = '12345678901234567', meaning = 'x' } }", "a code value must be 1 to 16"),
        ("{ a = { scheme = 'SCT', value = '1' } }", "output.codes.a.meaning: Field required"),
    ],
)
def test_a_manifest_code_that_cannot_be_checked_is_refused(tmp_path: Path, codes: str, needle: str) -> None:
    with pytest.raises(ManifestError) as err:
        _codes(tmp_path, codes)
    assert needle in err.value.message and len(err.value.message.splitlines()) == 1


def test_manifest_codes_stay_out_of_the_dump_make_engine_hashes(tmp_path: Path) -> None:
    # `make engine` reuses an artifact while the manifest's dump is unchanged: naming codes must not rebuild it.
    (tmp_path / "model.toml").write_text(_CODED)
    plain = load_manifest(tmp_path, require_onnx=False).manifest
    (tmp_path / "model.toml").write_text(_CODED + "codes = { a = 'SCT:Lesion' }\n")
    coded = load_manifest(tmp_path, require_onnx=False).manifest
    assert coded.output.codes and coded.model_dump(mode="json") == plain.model_dump(mode="json")
