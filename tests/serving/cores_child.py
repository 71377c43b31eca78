"""A spawned process's part of tests/serving/test_cores.py (spawned processes import it)."""

from __future__ import annotations

from typing import Any


def hold_claim(share: Any, started: Any, release: Any) -> None:
    """Answer as worker 0 (hold a claim) until ``release`` is set."""
    with share.claim(0):
        started.set()
        release.wait(60)


def wait_for_turn(share: Any, started: Any) -> None:
    """Sleep as worker 1 until its turn."""
    started.set()
    share.wait_turn(1, 60)
