"""A spawned process's part of tests/serving/test_cores.py (spawned processes import it)."""

from __future__ import annotations

from typing import Any


def hold_claim(share: Any, started: Any, release: Any) -> None:
    """Answer (hold a claim) until ``release`` is set."""
    with share.claim():
        started.set()
        release.wait(60)
