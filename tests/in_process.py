"""The config in-process tests of the scoring core share: the pipeline-test model on ONNX Runtime, one decode
thread, every folder under the test's own tmp_path."""

from __future__ import annotations

from pathlib import Path

from appliance.config import Config, InferenceConfig, ModelConfig, StorageConfig, WatchConfig
from tests.integration.conftest import TEST_MODEL


def in_process_config(tmp_path: Path, **sections: object) -> Config:
    config = Config(
        watch=WatchConfig(dir=tmp_path / "in", processed_dir=tmp_path / "done", rejected_dir=tmp_path / "rejected"),
        storage=StorageConfig(data_dir=tmp_path / "data"),
        model=ModelConfig(dir=TEST_MODEL),
        inference=InferenceConfig(backend="onnxruntime", threads=1, decode_workers=1, decode_with="threads"),
        **sections,  # type: ignore[arg-type]
    )
    config.watch.dir.mkdir(parents=True, exist_ok=True)
    return config
