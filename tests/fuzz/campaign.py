"""`make fuzz`: N seeded cases through the readers and preprocessing, a summary, and a file per finding.

    python -m tests.fuzz.campaign --cases 2000 --seed 1          # a campaign
    python -m tests.fuzz.campaign --seed 1 --case 476 --show     # one case again: its steps and outcome

Case i of seed S is the same bytes on every run (see mutate.case_for), so a campaign can be split over
processes or machines with --start. Each finding (crash, hang, memory blowup, uncaught exception, unusable
tensor) is run again alone to confirm it, then written to tests/fuzz/regressions/ as <hash>.bin (the input)
and <hash>.json (what happened, what to expect once fixed), which tests/fuzz/test_fuzz.py replays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.fuzz.harness import FINDINGS, MEMORY_MB, TIMEOUT_S, Outcome, Pool
from tests.fuzz.mutate import Case, case_for
from tests.fuzz.seeds import Seed, corpus

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
NAMES = {"dicom": "input.dcm", "png": "input.png", "jpeg": "input.jpg", "tiff": "input.tif"}
LABELS = {
    "crash": "crashes",
    "hang": "hangs",
    "memory": "memory blowups",
    "uncaught": "uncaught exceptions",
    "bad_output": "bad outputs",
}


def fingerprint(seeds: Sequence[Seed]) -> str:
    """Names and bytes of the corpus: two runs with the same seed make the same cases only if this agrees."""
    h = hashlib.sha256()
    for seed in seeds:
        h.update(seed.name.encode() + b"\0" + hashlib.sha256(seed.data).digest())
    return h.hexdigest()[:12]


def signature(outcome: Outcome, case: Case) -> str:
    """Findings likely to share a cause: the same kind and code, and where they happened."""
    where = ""
    if outcome.kind == "uncaught":
        frames = re.findall(r'File "([^"]+)", line (\d+)', outcome.detail)
        if frames:
            where = f"{Path(frames[-1][0]).name}:{frames[-1][1]}"
    elif outcome.kind == "crash":
        frames = re.findall(r'File "([^"]+)", line (\d+)', outcome.detail)
        where = f"{Path(frames[0][0]).name}:{frames[0][1]}" if frames else case.kind
    else:
        where = case.kind
    return f"{outcome.label} @ {where}"


def expected_code(outcome: Outcome, case: Case) -> str:
    """A first guess at what the input should give once the bug is fixed; a person confirms it."""
    if outcome.kind == "bad_output":
        return "clean"
    return "corrupt_dicom" if case.kind == "dicom" or case.data[128:132] == b"DICM" else "corrupt_image"


def write_regression(folder: Path, case: Case, outcome: Outcome, confirmed: Outcome, seed: int, index: int) -> Path:
    digest = hashlib.sha256(case.data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{digest}.bin").write_bytes(case.data)
    record = {
        "input": f"{digest}.bin",
        "name": NAMES[case.kind],
        "outcome": outcome.label,
        "detail": outcome.detail,
        "seconds": round(outcome.seconds, 3),
        "reproduced": confirmed.label == outcome.label,
        "reproduced_as": confirmed.label,
        "expected": expected_code(outcome, case),
        "expected_note": "guessed by the fuzzer from the input's format; set by hand after review",
        "found_by": {
            "seed": seed,
            "case": index,
            "base": case.seed,
            "steps": list(case.steps),
            "corpus": fingerprint(corpus()),
            "memory_mb": MEMORY_MB,
            "timeout_s": TIMEOUT_S,
        },
    }
    path = folder / f"{digest}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _cases(seed: int, start: int, count: int, seeds: Sequence[Seed]) -> Iterator[tuple[int, str, bytes]]:
    for index in range(start, start + count):
        case = case_for(seed, index, seeds)
        yield index, NAMES[case.kind], case.data


def run_campaign(
    cases: int,
    seed: int,
    *,
    start: int = 0,
    jobs: int = 2,
    out: Path | None = REGRESSIONS,
    keep: int = 3,
    memory_mb: int = MEMORY_MB,
    timeout_s: float = TIMEOUT_S,
    progress: bool = False,
) -> dict[str, object]:
    """Run cases start..start+cases-1 of `seed`; returns the summary (and writes findings under `out`)."""
    seeds = corpus()
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    findings: list[tuple[int, Outcome]] = []
    slowest: list[tuple[float, int]] = []
    t0 = time.monotonic()
    with Pool(jobs, memory_mb=memory_mb, timeout_s=timeout_s) as pool:
        for done, (index, outcome) in enumerate(pool.run(_cases(seed, start, cases, seeds)), 1):
            kinds[outcome.kind] += 1
            if outcome.kind == "rejected":
                codes[outcome.code] += 1
            if outcome.finding:
                findings.append((index, outcome))
            slowest = sorted([*slowest, (outcome.seconds, index)])[-5:]
            if progress and done % 5000 == 0:
                rate = done / (time.monotonic() - t0)
                print(f"  ... {done:,} cases, {rate:.0f}/s, {len(findings)} findings", file=sys.stderr, flush=True)
        restarts = pool.restarts
    elapsed = time.monotonic() - t0
    written: list[str] = []
    groups: dict[str, list[int]] = defaultdict(list)
    unconfirmed: list[int] = []
    if findings:
        # Each finding again, alone, in a fresh worker: a hang on a busy machine may just be slow.
        with Pool(1, memory_mb=memory_mb, timeout_s=timeout_s * 3) as alone:
            for index, outcome in sorted(findings, key=lambda f: f[0]):
                case = case_for(seed, index, seeds)
                again = alone.run_one(NAMES[case.kind], case.data)
                key = signature(outcome, case)
                groups[key].append(index)
                if not again.finding:
                    unconfirmed.append(index)
                if out is not None and (keep <= 0 or len(groups[key]) <= keep):
                    written.append(str(write_regression(out, case, outcome, again, seed, index)))
    return {
        "seed": seed,
        "first_case": start,
        "cases": sum(kinds.values()),
        "jobs": jobs,
        "corpus": f"{len(seeds)} seeds, fingerprint {fingerprint(seeds)}",
        "clean": kinds["clean"],
        "rejected": kinds["rejected"],
        "rejections": dict(codes.most_common()),
        **{kind: kinds[kind] for kind in FINDINGS},
        "seconds": round(elapsed, 1),
        "cases_per_s": round(sum(kinds.values()) / elapsed, 1) if elapsed else 0.0,
        "worker_restarts": restarts,
        "slowest": [(round(s, 2), i) for s, i in reversed(slowest)],
        "findings_by_signature": {k: v for k, v in groups.items()},
        "not_reproduced_alone": unconfirmed,
        "written": written,
    }


def print_summary(summary: dict[str, object]) -> None:
    s = summary
    last = int(s["first_case"]) + int(s["cases"]) - 1  # type: ignore[call-overload]
    print(f"fuzz: seed {s['seed']}, cases {s['first_case']}..{last}, " + f"{s['jobs']} workers, corpus {s['corpus']}")
    print(f"  cases                {s['cases']:>9,}")
    print(f"  clean                {s['clean']:>9,}")
    print(f"  rejected             {s['rejected']:>9,}")
    for code, n in dict(s["rejections"]).items():  # type: ignore[call-overload]
        print(f"    {code:<27}{n:>8,}")
    for kind in FINDINGS:
        print(f"  {LABELS[kind]:<21}{s[kind]:>9,}")
    print(f"  {s['seconds']} s, {s['cases_per_s']} cases/s, {s['worker_restarts']} worker restarts")
    print(f"  slowest cases (s, case): {s['slowest']}")
    groups: dict[str, list[int]] = s["findings_by_signature"]  # type: ignore[assignment]
    for key, indices in groups.items():
        shown = ", ".join(str(i) for i in indices[:10]) + (" ..." if len(indices) > 10 else "")
        print(f"  finding {key}: {len(indices)} case(s): {shown}")
    if s["not_reproduced_alone"]:
        print(f"  not reproduced when run alone: {s['not_reproduced_alone']}")
    for path in s["written"]:  # type: ignore[attr-defined]
        print(f"  wrote {os.path.relpath(str(path))}")


def show_case(seed: int, index: int, save: Path | None, timeout_s: float) -> int:
    case = case_for(seed, index, corpus())
    print(f"case {index} of seed {seed}: {case.seed} ({case.kind}), {len(case.data):,} bytes")
    for step in case.steps:
        print(f"  {step}")
    if save is not None:
        save.write_bytes(case.data)
        print(f"  saved to {save}")
    with Pool(1, timeout_s=timeout_s) as pool:
        outcome = pool.run_one(NAMES[case.kind], case.data)
    print(f"  -> {outcome.label} in {outcome.seconds:.3f} s")
    if outcome.detail:
        print("     " + outcome.detail.strip().replace("\n", "\n     "))
    return 1 if outcome.finding else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="how many cases (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the campaign's seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="the first case's index, to split a campaign")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    parser.add_argument("--keep", type=int, default=3, help="findings written per signature (0: all)")
    parser.add_argument("--out", type=Path, default=REGRESSIONS, help="where findings are written")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per case (default 10)")
    parser.add_argument("--memory-mb", type=int, default=MEMORY_MB, help="address space per worker (default 2048)")
    parser.add_argument("--json", type=Path, help="also write the summary here as JSON")
    parser.add_argument("--case", type=int, help="run this one case and print its steps and outcome")
    parser.add_argument("--show", action="store_true", help="with --case: the same (default)")
    parser.add_argument("--save", type=Path, help="with --case: write its bytes here")
    args = parser.parse_args(argv)
    if args.case is not None:
        return show_case(args.seed, args.case, args.save, args.timeout)
    summary = run_campaign(
        args.cases,
        args.seed,
        start=args.start,
        jobs=args.jobs,
        out=args.out,
        keep=args.keep,
        memory_mb=args.memory_mb,
        timeout_s=args.timeout,
        progress=True,
    )
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(summary[kind] for kind in FINDINGS) else 0


if __name__ == "__main__":
    sys.exit(main())
