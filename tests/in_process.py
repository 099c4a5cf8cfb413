"""What in-process tests of the scoring core share: its config (the pipeline-test model on ONNX Runtime, one
decode thread, every folder under the test's own tmp_path) and the real core itself, for a way in to feed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.api.metrics import Metrics
from appliance.config import Config, InferenceConfig, ModelConfig, StorageConfig, WatchConfig
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.domain.result import Result
from appliance.inference.loader import open_backend
from appliance.intake.intake import Intake
from appliance.journal.journal import Journal
from appliance.scoring.stages import ScoringStages
from tests.integration.conftest import TEST_MODEL
from tests.waiting import eventually


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


@dataclass
class ScoringCore:
    """The real scoring core a way in hands its inputs to: the journal, the stages and the one intake."""

    config: Config
    journal: Journal
    stages: ScoringStages
    intake: Intake
    metrics: Metrics
    faults: Faults


@contextmanager
def scoring_core(tmp_path: Path, faults: Faults | None = None) -> Iterator[ScoringCore]:
    """The pipeline-test model on ONNX Runtime behind a real journal, stages and intake, stopped after."""
    config = in_process_config(tmp_path)
    loaded = load_manifest(TEST_MODEL)
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    journal = Journal(config.storage.data_dir / "journal.sqlite3")
    metrics = Metrics()
    faults = faults or Faults()
    stages = ScoringStages(config, loaded.manifest, backend, journal, metrics, faults=faults)
    stages.start()
    intake = Intake(journal, stages, config.watch, on_duplicate=metrics.duplicates.inc, faults=faults)
    try:
        yield ScoringCore(config, journal, stages, intake, metrics, faults)
    finally:
        stages.stop(timeout=10)
        backend.close()
        journal.close()


def results_of(journal: Journal, input_id: int, timeout: float = 60.0) -> list[Result]:
    """The input's stored results, waiting for them (on the journal's commits) up to ``timeout``."""
    stored = eventually(
        lambda: journal.results_for_input(input_id),
        f"a result for input {input_id}",
        timeout=timeout,
        wait=lambda: journal.wait_for_results(journal.last_sequence(), 1.0),
    )
    return [s.result() for s in stored]
