"""Record checks: every answer must be found at its ``answer_start`` in its context."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import datasets

from qa_lightning.core.errors import DataError

log = logging.getLogger(__name__)

OnBadRecord = Literal["error", "skip"]
SHOWN_PROBLEMS = 10


def record_problems(examples: datasets.Dataset, allow_unanswerable: bool = False) -> dict[str, str]:
    """``{id: problem}`` for every record that cannot be trained or scored as it is."""
    problems: dict[str, str] = {}
    counts = Counter(examples["id"][:])
    for qid, context, question, answers in zip(
        *(examples[c][:] for c in ("id", "context", "question", "answers")), strict=True
    ):
        problem = _problem(context, question, answers, allow_unanswerable)
        if counts[qid] > 1:
            problem = f"id appears {counts[qid]} times"
        if problem:
            problems[qid] = problem
    return problems


def _problem(
    context: str, question: str, answers: dict[str, list], allow_unanswerable: bool
) -> str | None:
    if not context.strip():
        return "empty context"
    if not question.strip():
        return "empty question"
    if not answers["text"] and not allow_unanswerable:
        return "no answer (SQuAD v1 needs one; use a SQuAD v2 config for unanswerable questions)"
    for text, start in zip(answers["text"], answers["answer_start"], strict=True):
        if not text.strip():
            return "empty answer text"
        if start < 0 or start + len(text) > len(context):
            return f"answer '{text}' at {start} lies outside the context ({len(context)} chars)"
        found = context[start : start + len(text)]
        if found != text:
            return f"answer '{text}' is not at answer_start {start} (context has '{found}' there)"
    return None


def check_records(
    examples: datasets.Dataset,
    source: str,
    on_bad_record: OnBadRecord = "error",
    allow_unanswerable: bool = False,
) -> tuple[datasets.Dataset, dict[str, str]]:
    """Raise on bad records, or with ``on_bad_record="skip"`` drop them and say how many.

    Returns the kept examples and the ``{id: problem}`` of those skipped.
    """
    problems = record_problems(examples, allow_unanswerable)
    if not problems:
        return examples, {}
    bad = set(problems)
    count = sum(qid in bad for qid in examples["id"][:])  # both records of a duplicated id
    listed = "; ".join(f"{qid}: {p}" for qid, p in list(problems.items())[:SHOWN_PROBLEMS])
    more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    if on_bad_record == "error":
        raise DataError(
            f"{count} bad record(s) of {len(examples)} in {source}: {listed}{more}. "
            "Fix them, or set data.on_bad_record=skip to skip them (they are counted and listed)."
        )
    log.warning(
        "skipping %d bad record(s) of %d in %s: %s%s",
        count,
        len(examples),
        source,
        listed,
        more,
    )
    kept = examples.filter(lambda qid: qid not in bad, input_columns="id")
    return kept, problems
