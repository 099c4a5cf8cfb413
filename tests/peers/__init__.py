"""Real DICOM peers for the tests: Orthanc as the PACS, DCMTK as the scanner, dicom3tools' validator.

They are Debian packages, installed by `make test` (tests/peers/install.sh) where it runs as root with apt;
elsewhere each test that needs one is skipped with one line saying how to install them."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

INSTALL = "sudo apt-get install orthanc dcmtk dicom3tools"

# The system's folders first: pynetdicom installs its own `storescu`/`echoscu` (other options) in the venv's
# bin, which an activated venv puts first on PATH; and Debian puts Orthanc in /usr/sbin, off a user's PATH.
_SYSTEM = (Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/local/bin"), Path("/usr/local/sbin"))


def tool(name: str) -> Path | None:
    """Where a peer's program is (`Orthanc`, `storescu`, `dcmsend`, `echoscu`, `dciodvfy`), or None."""
    for folder in _SYSTEM:
        path = folder / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    return Path(found) if found else None


def missing(*names: str) -> str | None:
    """The one-line reason to skip where any of these programs is missing, else None."""
    absent = [name for name in names if tool(name) is None]
    return f"{', '.join(absent)} missing: {INSTALL}" if absent else None


def require(*names: str) -> None:
    """Skip the calling test, with one line saying what is missing and how to install it, unless all are here."""
    reason = missing(*names)
    if reason:
        pytest.skip(reason)


def needs(*names: str) -> pytest.MarkDecorator:
    """`require` as a mark, for a test or a module: `pytestmark = needs("Orthanc", "storescu")`."""
    reason = missing(*names)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def executable(name: str) -> Path:
    """The program's path; outside a test (e.g. `make bench`) a missing one is an error naming the install line."""
    path = tool(name)
    if path is None:
        raise FileNotFoundError(missing(name))
    return path


def free_port() -> int:
    """A loopback port free right now (the peer binds it a moment later; `Orthanc` retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dies_with_parent() -> list[str]:
    """The command prefix that has Linux kill a peer with the thread that starts it, so a test run killed with -9
    leaves no server holding its ports. `setpriv` sets it and then runs the peer: a `preexec_fn` would make Python
    fork() (not vfork) a process whose gRPC fork handlers then run in the child, and abort it where threads are
    scarce. The signal follows the starting *thread*, so only a start from the main thread asks for it (a restart
    from a helper thread that then ends would otherwise kill the peer)."""
    setpriv = tool("setpriv")
    if sys.platform != "linux" or setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [str(setpriv), "--pdeathsig", "KILL", "--"]
