"""DCMTK's command-line tools as the scanner (storescu, dcmsend, echoscu), and dicom3tools' dciodvfy."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from pydicom import uid
from pydicom.filereader import read_file_meta_info

from tests.peers import executable

TIMEOUT_S = 120.0  # the whole run; DCMTK's own timeouts below fail a silent peer sooner
_NETWORK = ("-to", "30", "-ta", "30", "-td", "60")  # connect, association, each message (s)

# storescu proposes only uncompressed syntaxes unless told, one compressed syntax per run (DCMTK 3.6.7); each
# of these options proposes the uncompressed ones too.
_PROPOSE: dict[str, str] = {
    uid.JPEGBaseline8Bit: "-xy",
    uid.JPEGExtended12Bit: "-xx",
    uid.JPEGLosslessSV1: "-xs",
    uid.JPEGLSLossless: "-xt",
    uid.JPEGLSNearLossless: "-xu",
    uid.JPEG2000Lossless: "-xv",
    uid.JPEG2000: "-xw",
    uid.RLELossless: "-xr",
    uid.DeflatedExplicitVRLittleEndian: "-xd",
}


def storescu(
    files: Iterable[Path],
    host: str,
    port: int,
    calling: str,
    called: str,
    extra_args: Sequence[str] = (),
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """C-STORE with `storescu`, proposing only the SOP classes the files need (`-R`: so Comprehensive 3D SR goes
    too) and the compressed syntax they are in. Files in different compressed syntaxes go in one run each,
    and the runs' results are merged (first non-zero exit status). Folders are sent with all their files.

    Its exit status is non-zero when the association is refused or a store is answered with a failure (it
    then halts the batch; `extra_args=["-nh"]` sends the rest, and then exits 0)."""
    runs: list[subprocess.CompletedProcess[str]] = []
    for option, group in _by_proposal(_expand(files)).items():
        command = [str(executable("storescu")), "-R", *option, "-aet", calling, "-aec", called, *_NETWORK]
        runs.append(_run([*command, *extra_args, host, str(port), *map(str, group)], timeout))
    if not runs:
        raise ValueError("storescu: no files to send")
    return _merged(runs)


def dcmsend(
    files: Iterable[Path],
    host: str,
    port: int,
    calling: str,
    called: str,
    extra_args: Sequence[str] = (),
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """C-STORE with `dcmsend`, which proposes each file's own syntax: a mix of uncompressed, JPEG, RLE, J2K and
    SR goes on one association. Its exit status says the association failed, not that a store was refused
    (that exits 0: check the peer, or pass `--create-report-file`)."""
    paths = [str(path) for path in _expand(files)]
    if not paths:
        raise ValueError("dcmsend: no files to send")
    command = [str(executable("dcmsend")), "-aet", calling, "-aec", called, *_NETWORK, *extra_args]
    return _run([*command, host, str(port), *paths], timeout)


def echoscu(
    host: str,
    port: int,
    calling: str,
    called: str,
    extra_args: Sequence[str] = (),
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with `echoscu`: exit status 0 when the association is accepted and the echo answered."""
    command = [str(executable("echoscu")), "-aet", calling, "-aec", called, *_NETWORK, *extra_args]
    return _run([*command, host, str(port)], timeout)


class Validation(NamedTuple):
    """dciodvfy's verdict: its exit status (1 where any error line is present) and the error lines."""

    rc: int
    errors: list[str]


def dciodvfy(path: Path, timeout: float = TIMEOUT_S) -> Validation:
    """Check a file against its IOD with dicom3tools' `dciodvfy` (it writes to stderr; warnings are not errors)."""
    done = _run([str(executable("dciodvfy")), str(path)], timeout)
    return Validation(done.returncode, parse_dciodvfy(done.stdout + done.stderr))


def parse_dciodvfy(output: str) -> list[str]:
    """The `Error - ...` lines of dciodvfy's output."""
    return [line.strip() for line in output.splitlines() if line.lstrip().startswith("Error")]


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)


def _expand(files: Iterable[Path]) -> list[Path]:
    paths: list[Path] = []
    for path in map(Path, files):
        paths.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return paths


def _by_proposal(paths: list[Path]) -> dict[tuple[str, ...], list[Path]]:
    """Files by the storescu option that proposes their syntax; uncompressed ones ride with the first group."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    plain: list[Path] = []
    for path in paths:
        option = _PROPOSE.get(_transfer_syntax(path) or "")
        if option is None:
            plain.append(path)  # uncompressed, or one storescu cannot propose: let it say so
        else:
            groups.setdefault((option,), []).append(path)
    if plain:
        first = next(iter(groups), ())
        groups[first] = plain + groups.get(first, [])
    return groups


def _transfer_syntax(path: Path) -> str | None:
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "")) or None
    except Exception:  # not a DICOM file: storescu reports it
        return None


def _merged(runs: list[subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    if len(runs) == 1:
        return runs[0]
    return subprocess.CompletedProcess(
        args=[run.args for run in runs],
        returncode=next((run.returncode for run in runs if run.returncode), 0),
        stdout="".join(run.stdout for run in runs),
        stderr="".join(run.stderr for run in runs),
    )
