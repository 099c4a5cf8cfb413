"""The one intake, in-process with the real scoring stages (pipeline-test model, a real journal): every way
in is registered, deduplicated and counted alike, and disposed of by the one policy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.api.metrics import Metrics
from appliance.config import Config
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.domain.result import Outcome
from appliance.files.content_hash import digest_bytes
from appliance.inference.loader import open_backend
from appliance.intake.intake import MAX_ATTEMPTS, Arrival, Intake
from appliance.journal.journal import Journal, Registration
from appliance.scoring.stages import ScoringStages
from tests.in_process import in_process_config
from tests.integration.conftest import TEST_MODEL, png_bytes
from tests.waiting import eventually


@dataclass
class Stages:
    intake: Intake
    journal: Journal
    metrics: Metrics
    config: Config


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[Stages]:
    config = in_process_config(tmp_path)
    loaded = load_manifest(TEST_MODEL)
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    metrics = Metrics()
    stages = ScoringStages(config, loaded.manifest, backend, journal, metrics, faults=Faults())
    stages.start()
    intake = Intake(journal, stages, config.watch, on_duplicate=metrics.duplicates.inc)
    try:
        yield Stages(intake, journal, metrics, config)
    finally:
        stages.stop(timeout=10)
        backend.close()
        journal.close()


def _arrival(folder: Path, name: str, data: bytes, source: str = "folder") -> Arrival:
    path = folder / name
    path.write_bytes(data)
    st = path.stat()
    return Arrival(
        source=source,  # type: ignore[arg-type]
        path=path,
        file_name=name,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_hash=digest_bytes(data),
    )


def _registered(journal: Journal, arrival: Arrival) -> Registration:
    """Journaled as a way in would, but not submitted (left queued, as a crash leaves it)."""
    return journal.register(
        source=arrival.source,
        path=str(arrival.path),
        file_name=arrival.file_name,
        size=arrival.size,
        mtime_ns=arrival.mtime_ns,
        content_hash=arrival.content_hash,
    )


def _duplicates(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("appliance_duplicates_total")
    return value or 0.0


def test_a_duplicate_by_any_way_in_is_counted_not_scored_and_disposed_of_like_its_original(stages: Stages) -> None:
    folder = stages.config.watch.dir
    data = png_bytes(11)
    first = stages.intake.submit(_arrival(folder, "a.png", data))
    assert first.duplicate_of is None and first.results is not None
    assert first.results.result(timeout=60)[0].outcome is Outcome.SCORED

    # The same content again in the folder: not scored, counted, moved where the original went.
    again = stages.intake.submit(_arrival(folder, "a-copy.png", data))
    assert again.duplicate_of == first.input_id
    assert not (folder / "a-copy.png").exists()
    moved = sorted(p.name for p in stages.config.watch.processed_dir.iterdir())
    assert f"{again.input_id:08d}-a-copy.png" in moved
    # And by Score: its spooled copy is deleted.
    spool = folder.parent / "spool"
    spool.mkdir()
    by_score = stages.intake.submit(_arrival(spool, "x.bin", data, source="grpc"))
    assert by_score.duplicate_of == first.input_id and not (spool / "x.bin").exists()
    assert _duplicates(stages.metrics) == 2.0
    assert len(stages.journal.results_for_input(first.input_id)) == 1


def test_the_queued_inputs_own_file_offered_again_is_left_to_its_job(stages: Stages) -> None:
    folder = stages.config.watch.dir
    arrival = _arrival(folder, "b.png", png_bytes(12))
    reg = _registered(stages.journal, arrival)
    again = stages.intake.submit(arrival)
    assert again.already_queued and again.input_id == reg.input.id
    assert arrival.path.exists() and _duplicates(stages.metrics) == 0.0


def test_an_input_unfinished_at_several_starts_is_set_aside_as_repeated_crash(stages: Stages) -> None:
    import threading

    folder = stages.config.watch.dir
    arrival = _arrival(folder, "poison.png", png_bytes(13))
    reg = _registered(stages.journal, arrival)
    for _ in range(MAX_ATTEMPTS):  # the starts before this one each found it unfinished
        stages.journal.count_attempt([reg.input.id])
    seen = stages.journal.last_sequence()
    stages.intake.requeue(stages.journal.pending(), threading.Event())
    stages.journal.wait_for_results(seen, 60)
    stored = stages.journal.results_for_input(reg.input.id)
    rejection = stored[0].result().rejection
    assert rejection is not None and rejection.code == "repeated_crash"
    # Set aside once its rejection is stored (the move follows the commit).
    set_aside = stages.config.watch.rejected_dir / f"{reg.input.id:08d}-poison.png"
    eventually(set_aside.exists, "the poison file set aside", timeout=30)


def test_a_folder_file_rewritten_while_the_daemon_was_down_is_not_scored_under_its_old_hash(stages: Stages) -> None:
    import threading

    folder = stages.config.watch.dir
    kept = _arrival(folder, "kept.png", png_bytes(14))
    rewritten = _arrival(folder, "rewritten.png", png_bytes(15))
    ids = {_registered(stages.journal, a).input.id: a for a in (kept, rewritten)}
    rewritten.path.write_bytes(png_bytes(16))  # the same name, other bytes, as a scanner's re-export
    stages.intake.requeue(stages.journal.pending(), threading.Event())
    codes = {}
    for input_id, arrival in ids.items():
        stored = eventually(lambda i=input_id: stages.journal.results_for_input(i), f"{arrival.file_name}'s result")
        rejection = stored[0].result().rejection
        codes[arrival.file_name] = rejection.code if rejection else "scored"
    assert codes == {"kept.png": "scored", "rewritten.png": "file_changed"}
    # Left in the folder, where its new content is the scanner's to be taken as a new input.
    assert rewritten.path.read_bytes() == png_bytes(16)
