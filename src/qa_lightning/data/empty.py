"""Data options that can leave nothing to work on, checked where the data is filtered.

Skipping bad records (``data.on_bad_record=skip``), an empty or all-invalid file, a reader that
yields nothing, or windowing that gives no windows would otherwise surface late and deep inside a
library (``datasets.load_from_disk`` on an empty cache entry: ``IndexError``). Each filter's
result is checked here, before windowing and caching: the error names the file, the option that
left nothing, and how many records were dropped for what reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from qa_lightning.core.errors import DataError


def problem_kind(problem: str) -> str:
    """A record problem without its particulars (quoted text, numbers), to count alike ones:
    ``"answer 'x' is not at answer_start 3 (...)"`` -> ``"answer is not at answer_start"``."""
    text = re.sub(r"\s*\(.*\)$", "", problem)
    text = re.sub(r"\s*'[^']*'", "", text)
    text = re.sub(r"\s*\b(at )?\d+\b", "", text)
    return " ".join(text.split())


def drop_reasons(ids: Iterable[str], problems: Mapping[str, str]) -> Counter[str]:
    """How many of the records ``ids`` (one per record, repeats counted) were dropped for each
    kind of problem in ``problems`` (``{id: problem}``)."""
    return Counter(problem_kind(problems[qid]) for qid in ids if qid in problems)


def require_examples(
    examples: Any, what: str, source: str, option: str, dropped: Mapping[str, int]
) -> None:
    """Raise a :class:`DataError` when ``examples`` is empty: ``what`` (e.g. ``"training
    questions"``) of ``source`` (a file or hub split), the ``option`` that left nothing, and the
    records ``dropped`` per reason."""
    if len(examples):
        return
    total = sum(dropped.values())
    ordered = sorted(dropped.items(), key=lambda item: -item[1])
    reasons = "; ".join(f"{count} for {reason}" for reason, count in ordered)
    detail = f"all {total} record(s) were dropped ({reasons})" if total else "it holds none"
    raise DataError(
        f"no {what} are left of {source} after {option}: {detail}. Nothing can be windowed or "
        f"cached; fix the data (see the reasons), or give another file."
    )
