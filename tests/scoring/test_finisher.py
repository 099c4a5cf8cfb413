"""The finisher in-process, on a real journal with results of the pipeline-test model: a group's results are
stored in one transaction, and where that transaction fails, each input's alone, so one input's rows hold back
no other's."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest

from appliance.config import LimitsConfig
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.domain.result import InputFacts, Outcome, Result
from appliance.files.content_hash import digest_bytes
from appliance.inference.batcher import BatchTiming
from appliance.inference.loader import open_backend
from appliance.inference.runs import rows_in_batches
from appliance.journal.journal import Journal
from appliance.prepare.preparer import Preparer
from appliance.scoring.admission import Admission
from appliance.scoring.finisher import Finisher
from appliance.scoring.job import Job, Scorer
from appliance.scoring.observer import NoObserver
from tests.in_process import in_process_config
from tests.integration.conftest import TEST_MODEL, png_bytes


def test_a_group_whose_transaction_fails_is_stored_one_input_at_a_time(tmp_path: Path) -> None:
    config = in_process_config(tmp_path)
    loaded = load_manifest(TEST_MODEL)
    manifest = loaded.manifest
    journal = Journal(tmp_path / "journal.sqlite3")
    admission = Admission(8, lambda _count: None)
    scorer = Scorer(manifest, "onnxruntime")
    finisher = Finisher(journal, config.watch, admission, NoObserver(), lambda: scorer, Faults())
    preparer = Preparer(manifest, LimitsConfig())
    jobs: list[Job] = []
    with open_backend(loaded, config.inference, config.model.engines_dir) as backend:
        for seed in (1, 2, 3):
            data = png_bytes(seed)
            path = config.watch.dir / f"{seed}.png"
            path.write_bytes(data)
            job = _journaled(journal, path, data)
            job.prepared = preparer.prepare(data, path.name)
            rows = rows_in_batches(backend, job.prepared.tensors, manifest.output.activation)
            job.frames = [(row, None, BatchTiming(0.0, 0.0, len(rows), scored_by=scorer)) for row in rows]
            jobs.append(job)
    # The second input came out of the stages with no frame: the journal refuses an input without results, and
    # with it the group's one transaction.
    jobs[1].frames = []
    for job in jobs:
        admission.admit()
        admission.arrived()
        finisher.put(job)
    finisher.start()  # after the puts: all three are one group
    try:
        first, refused, third = (job.future for job in jobs)
        assert first is not None and refused is not None and third is not None
        for answered, job in ((first, jobs[0]), (third, jobs[2])):
            results = answered.result(timeout=60)
            assert [r.outcome for r in results] == [Outcome.SCORED]
            assert results[0].sequence > 0
            assert [s.result() for s in journal.results_for_input(job.facts.input_id)] == results
            stored = journal.get_input(job.facts.input_id)
            assert stored is not None and stored.state == "scored"
            assert not job.path.exists()  # moved aside
        with pytest.raises(ValueError, match="at least one result"):
            refused.result(timeout=60)
        assert [row.id for row in journal.pending()] == [jobs[1].facts.input_id]  # queued, for the next start
        assert jobs[1].path.exists()
        assert admission.wait_idle(60)  # every slot given back
    finally:
        finisher.stop()
        journal.close()


def _journaled(journal: Journal, path: Path, data: bytes) -> Job:
    digest = digest_bytes(data)
    reg = journal.register(
        source="folder", path=str(path), file_name=path.name, size=len(data), mtime_ns=1, content_hash=digest
    )
    facts = InputFacts(input_id=reg.input.id, source="folder", file_name=path.name, content_hash=digest)
    answer: Future[list[Result]] = Future()
    return Job(facts=facts, path=path, future=answer)
