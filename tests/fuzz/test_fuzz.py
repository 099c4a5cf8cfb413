"""A short seeded slice of the fuzzer, a Hypothesis-driven one, and a replay of every saved finding.

Each input runs in a worker process under a memory and a time limit (harness.py); a good outcome is a usable
tensor or a rejection with a code. `make fuzz` runs the long campaigns that fill regressions/.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.campaign import NAMES, REGRESSIONS, run_campaign
from tests.fuzz.harness import Pool
from tests.fuzz.mutate import case_for, make_case
from tests.fuzz.seeds import corpus

SLICE_SEED = 0
SLICE_CASES = 2000
HYPOTHESIS_CASES = 100
RECORDS = sorted(REGRESSIONS.glob("*.json"))


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    with Pool(2, timeout_s=5.0) as workers:  # replays of known hangs cost this much each
        yield workers


class HypothesisSource:
    """The mutations' choices drawn by Hypothesis, which then shrinks a failing case to fewer, smaller edits."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def below(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1)) if n > 1 else 0

    def raw(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


def test_every_seed_decodes_or_is_a_known_rejection(pool: Pool) -> None:
    seeds = corpus()
    outcomes = {key: outcome for key, outcome in pool.run((s.name, NAMES[s.kind], s.data) for s in seeds)}
    assert not [f"{name}: {o.label}" for name, o in outcomes.items() if o.finding]
    clean = sum(o.kind == "clean" for o in outcomes.values())
    # The few seeds that are rejected on purpose: reports, a truncated file, a bad VR, 12-bit JPEG.
    assert clean >= len(seeds) - 8, {name: o.label for name, o in outcomes.items() if o.kind != "clean"}


def test_cases_are_reproducible_from_their_seed() -> None:
    seeds = corpus()
    for index in (0, 1, 977, 123_456):
        first, again = case_for(7, index, seeds), case_for(7, index, seeds)
        assert first == again
    assert case_for(7, 0, seeds).data != case_for(8, 0, seeds).data or case_for(7, 1, seeds) != case_for(8, 1, seeds)


def test_seeded_slice_finds_nothing(tmp_path: Path) -> None:
    summary = run_campaign(SLICE_CASES, SLICE_SEED, jobs=2, out=tmp_path, keep=0)
    assert summary["cases"] == SLICE_CASES
    found = summary["findings_by_signature"]
    assert not found, (
        f"{found}: reproduce with `python -m tests.fuzz.campaign --seed {SLICE_SEED} --case N`; "
        f"the inputs are in {tmp_path}"
    )


@settings(
    max_examples=HYPOTHESIS_CASES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hypothesis_mutations_find_nothing(pool: Pool, data: st.DataObject) -> None:
    case = make_case(HypothesisSource(data), corpus())
    outcome = pool.run_one(NAMES[case.kind], case.data)
    assert not outcome.finding, f"{case.seed} {case.steps}: {outcome.label}\n{outcome.detail}"


@pytest.mark.parametrize("record", RECORDS, ids=[p.stem for p in RECORDS])
def test_saved_finding_is_now_handled(pool: Pool, record: Path) -> None:
    """A finding of an earlier campaign now gives the outcome its record expects: a rejection code, or clean."""
    saved = json.loads(record.read_text())
    data = (REGRESSIONS / saved["input"]).read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith(record.stem)
    outcome = pool.run_one(saved["name"], data)
    expected = saved["expected"] if saved["expected"] == "clean" else f"rejected:{saved['expected']}"
    assert outcome.label == expected, f"was {saved['outcome']}; now {outcome.label}: {outcome.detail[-2000:]}"
