"""What a model answers, as a table: one row per question (gold answers, the model's best answer,
its probability, SQuAD F1), and the markdown TensorBoard's TEXT tab shows. Pure functions; the
callback that logs the table at each validation is
:class:`~qa_lightning.runs.monitoring.ValidationAnswers`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qa_lightning.answers.metrics import f1_score

#: The columns of the answers table.
ANSWER_COLUMNS = ("id", "question", "gold", "answer", "probability", "f1")


@dataclass(frozen=True)
class AnswerRow:
    """One question of the answers table: its gold answers and the model's best answer."""

    id: str
    question: str
    gold: tuple[str, ...]
    answer: str
    probability: float
    f1: float

    def cells(self) -> list[Any]:
        """The row's values in :data:`ANSWER_COLUMNS` order (gold answers joined by `` / ``)."""
        gold = " / ".join(dict.fromkeys(self.gold))
        return [self.id, self.question, gold, self.answer, round(self.probability, 4), self.f1]


def answer_rows(
    ids: Sequence[str],
    questions: Sequence[str],
    golds: Sequence[Sequence[str]],
    answers: Sequence[tuple[str, float]],
) -> list[AnswerRow]:
    """Rows of (best answer, its probability) per question, each scored with SQuAD F1 in percent
    against its best-matching gold answer (an empty gold list: a v2 question without answer)."""
    rows = []
    for qid, question, gold, (answer, probability) in zip(
        ids, questions, golds, answers, strict=True
    ):
        references = list(gold) or [""]
        f1 = max(f1_score(answer, r) for r in references)
        rows.append(AnswerRow(qid, question, tuple(gold), answer, probability, round(100 * f1, 2)))
    return rows


def _cell(value: Any) -> str:
    """A markdown table cell: pipes escaped, line breaks as spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def answers_table(rows: Iterable[AnswerRow], title: str = "") -> str:
    """A markdown table of ``rows`` (TensorBoard's TEXT tab renders it), under ``title``."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(ANSWER_COLUMNS) + " |")
    lines.append("|" + "---|" * len(ANSWER_COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row.cells()) + " |")
    return "\n".join(lines) + "\n"


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when fewer)."""
    if total <= 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))})
