"""[inference]: the backend named against the registry, and each backend's settings read from the flat keys
configs have always used (threads, device) or from its own [inference.<name>] table."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import InferenceConfig, load_config
from appliance.domain.errors import ConfigError


def test_an_unknown_backend_in_the_config_is_refused_with_the_choices(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[inference]\nbackend = "openvino"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = err.value.message
    assert "inference.backend" in message and "'openvino' is not an inference backend" in message
    assert "auto, onnxruntime, tensorrt, triton" in message


def test_backend_settings_read_from_the_flat_keys_or_the_backend_table(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text("[inference]\nthreads = 2\ndevice = 1\n")
    flat = load_config(config).inference
    assert flat.settings_of("onnxruntime").model_dump() == {"threads": 2}
    assert flat.settings_of("tensorrt").model_dump() == {"device": 1} and flat.device == 1
    config.write_text("[inference.onnxruntime]\nthreads = 3\n[inference.tensorrt]\ndevice = 2\n")
    table = load_config(config).inference
    assert table.settings_of("onnxruntime").model_dump() == {"threads": 3} and table.device == 2
    assert InferenceConfig.model_validate(table.model_dump()) == table
    assert InferenceConfig(threads=4).settings_of("onnxruntime").model_dump() == {"threads": 4}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[inference]\ndevice = -1\n", "inference.device: Input should be greater than or equal to 0"),
        ("[inference.tensorrt]\ndevice = -1\n", "inference.tensorrt.device: Input should be greater"),
        ("[inference.tensorrt]\nthreads = 1\n", "inference.tensorrt.threads: Extra inputs are not permitted"),
        ("[inference]\ndevice = 1\n[inference.tensorrt]\ndevice = 2\n", "device is set both as inference.device"),
    ],
)
def test_backend_setting_mistakes_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(config)
