"""Shared behaviour of the entry points: clear one-paragraph errors instead of tracebacks."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from qa_lightning.errors import QAError

T = TypeVar("T")
log = logging.getLogger("qa_lightning")


def report_errors(task: Callable[[], T]) -> T:
    """Run ``task``; on a :class:`QAError` print its message and exit with status 2.

    ``HYDRA_FULL_ERROR=1`` lets the full traceback through instead.
    """
    try:
        return task()
    except QAError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
