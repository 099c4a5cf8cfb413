"""What the whole suite shares: the tests `make check` leaves to `make test` (the `slow` marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Each test there starts the real daemon, often with Orthanc or DCMTK beside it: minutes in all.
_RUNNING_DAEMON = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_RUNNING_DAEMON):
            item.add_marker(pytest.mark.slow)
