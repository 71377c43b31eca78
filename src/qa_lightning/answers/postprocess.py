"""Start/end logits -> answer spans, vectorised over windows (as ``utils_qa.py``).

A window's candidates are pairs of its ``n_best`` highest start and ``n_best`` highest end
logits whose tokens lie in the context, with ``start <= end`` and at most ``max_answer_length``
tokens; a candidate's score is ``start_logit + end_logit``. An example's answer is its best
candidate over all of its windows, or ``""`` when no window has a valid candidate. For SQuAD v2,
a window's "no answer" score is its CLS start + end logit, and an example's the minimum over its
windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qa_lightning.data.windowing import NO_OFFSET


@dataclass
class WindowSpans:
    """Best ``top_k`` candidates of each window; invalid candidates have score ``-inf``."""

    scores: torch.Tensor  # (windows, top_k)
    start_chars: torch.Tensor  # (windows, top_k)
    end_chars: torch.Tensor  # (windows, top_k)
    null_scores: torch.Tensor  # (windows,): CLS start + end logit, the "no answer" score


def best_window_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offsets: torch.Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    top_k: int = 1,
) -> WindowSpans:
    """Best candidate spans of each window, as character offsets into the context.

    ``offsets`` is ``(windows, tokens, 2)`` with ``NO_OFFSET`` for tokens outside the context.
    """
    start_logits, end_logits = start_logits.float(), end_logits.float()
    k = min(n_best, start_logits.shape[1])
    start_values, start_tokens = _top(start_logits, k)
    end_values, end_tokens = _top(end_logits, k)
    token_starts = offsets[..., 0]
    start_in_context = token_starts.gather(1, start_tokens) != NO_OFFSET
    end_in_context = token_starts.gather(1, end_tokens) != NO_OFFSET
    span_length = end_tokens[:, None, :] - start_tokens[:, :, None] + 1
    valid = (
        start_in_context[:, :, None]
        & end_in_context[:, None, :]
        & (span_length >= 1)
        & (span_length <= max_answer_length)
    )
    scores = start_values[:, :, None] + end_values[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf")).flatten(1)
    top_scores, flat = _top(scores, min(top_k, scores.shape[1]))
    best_start_tokens = start_tokens.gather(1, flat // k)
    best_end_tokens = end_tokens.gather(1, flat % k)
    return WindowSpans(
        scores=top_scores,
        start_chars=token_starts.gather(1, best_start_tokens),
        end_chars=offsets[..., 1].gather(1, best_end_tokens),
        null_scores=start_logits[:, 0] + end_logits[:, 0],
    )


def _top(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row and their indices, equal values in index order
    (``topk`` orders ties by how the row was laid out: a window's candidates would then depend
    on its padding, and so on the other windows of its batch)."""
    ordered, index = values.sort(dim=1, descending=True, stable=True)
    return ordered[:, :k], index[:, :k]


def window_rows(example_index: torch.Tensor, spans: WindowSpans) -> torch.Tensor:
    """One float64 row per window (example index, best score, start, end, null score): the
    input of :func:`example_answers`, in a form that gathers across DDP ranks."""
    columns = (example_index, spans.scores[:, 0], spans.start_chars[:, 0], spans.end_chars[:, 0])
    return torch.stack([c.double() for c in (*columns, spans.null_scores)], dim=1)


def best_example_spans(
    example_index: np.ndarray,
    scores: np.ndarray,
    start_chars: np.ndarray,
    end_chars: np.ndarray,
    num_examples: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best window candidate of each example (windows may come in any order, even repeated).

    Returns ``(scores, start_chars, end_chars)`` of length ``num_examples``; an example without a
    valid candidate has score ``-inf`` and span ``(0, 0)``.
    """
    best_scores = np.full(num_examples, -np.inf)
    best_starts = np.zeros(num_examples, dtype=np.int64)
    best_ends = np.zeros(num_examples, dtype=np.int64)
    valid = np.isfinite(scores)
    order = np.argsort(-scores[valid], kind="stable")
    indices, first = np.unique(example_index[valid][order], return_index=True)
    chosen = order[first]
    best_scores[indices] = scores[valid][chosen]
    best_starts[indices] = start_chars[valid][chosen]
    best_ends[indices] = end_chars[valid][chosen]
    return best_scores, best_starts, best_ends


def example_null_scores(
    example_index: np.ndarray, null_scores: np.ndarray, num_examples: int
) -> np.ndarray:
    """An example's null score: the minimum over its windows (as ``utils_qa.py``)."""
    nulls = np.full(num_examples, np.inf)
    np.minimum.at(nulls, example_index, null_scores)
    return nulls


def answer_texts(contexts: list[str], start_chars: np.ndarray, end_chars: np.ndarray) -> list[str]:
    """Slice each context by its span; ``(0, 0)`` gives ``""``."""
    return [c[int(s) : int(e)] for c, s, e in zip(contexts, start_chars, end_chars, strict=True)]


@dataclass
class ExampleAnswers:
    """Each example's best span text, and its "no answer" score (null score - best span score,
    ``inf`` when it has no valid span)."""

    answers: dict[str, str]
    null_diffs: dict[str, float]

    def predictions(self, null_score_diff_threshold: float | None = None) -> dict[str, str]:
        """``{id: answer}``; with a threshold (v2), ``""`` where the null score wins by more."""
        if null_score_diff_threshold is None:
            return dict(self.answers)
        return {
            qid: "" if self.null_diffs[qid] > null_score_diff_threshold else text
            for qid, text in self.answers.items()
        }


def example_answers(window_rows: np.ndarray, ids: list[str], contexts: list[str]) -> ExampleAnswers:
    """Reduce windows to examples.

    ``window_rows`` has one row per window (any order, repeats allowed): example index, best span
    score, its start and end characters, and the window's null score.
    """
    index = window_rows[:, 0].astype(np.int64)
    scores, starts, ends = best_example_spans(
        index, window_rows[:, 1], window_rows[:, 2], window_rows[:, 3], len(ids)
    )
    null_diffs = example_null_scores(index, window_rows[:, 4], len(ids)) - scores
    return ExampleAnswers(
        answers=dict(zip(ids, answer_texts(contexts, starts, ends), strict=True)),
        null_diffs=dict(zip(ids, null_diffs.tolist(), strict=True)),
    )
