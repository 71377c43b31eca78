"""Sliding-window tokenisation of SQuAD examples (pure functions of tokenizer outputs).

Semantics follow the Hugging Face question-answering reference (``utils_qa.py``): the question is
kept whole, the context is split into windows of ``max_length`` tokens overlapping by ``stride``
tokens (``truncation="only_second"``), and a training window whose context does not wholly contain
the answer is labelled ``(cls_index, cls_index)``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from qa_lightning.core.errors import Problem

#: Special tokens a (question, context) pair adds at most (RoBERTa: <s> q </s></s> c </s>).
PAIR_SPECIAL_TOKENS = 4
#: Offset given to tokens outside the context (question, special and padding tokens) in
#: evaluation windows, so that offsets collate into tensors.
NO_OFFSET = -1


def windowing_problem(
    max_length: int, stride: int, max_question_tokens: int, prefix: str = ""
) -> Problem | None:
    """The first rule that these sizes break, with keys named ``prefix + name`` (``data.`` in
    configs), else ``None``. A window of ``max_length`` tokens keeps up to
    ``max_question_tokens`` question tokens and :data:`PAIR_SPECIAL_TOKENS` special tokens; the
    rest is the context's room, which the stride (the overlap of windows) must stay below: the
    tokenizer panics otherwise."""
    length, overlap, question = (
        f"{prefix}{name}" for name in ("max_length", "stride", "max_question_tokens")
    )
    room = max_length - max_question_tokens - PAIR_SPECIAL_TOKENS
    rules = (
        (max_length > 0, length, max_length, "must be > 0 (e.g. 384)."),
        (stride >= 0, overlap, stride, "must be >= 0 (e.g. 128)."),
        (
            stride < max_length,
            overlap,
            stride,
            f"the overlap must be smaller than {length}={max_length} (e.g. 128 for 384).",
        ),
        (max_question_tokens > 0, question, max_question_tokens, "must be > 0 (e.g. 64)."),
        (
            room > 0,
            question,
            max_question_tokens,
            f"windows of {length}={max_length} tokens would have no room for the context after "
            f"{max_question_tokens} question tokens and {PAIR_SPECIAL_TOKENS} special tokens: "
            f"lower {question} (e.g. 64) or raise {length}.",
        ),
        (
            stride < room,
            overlap,
            stride,
            f"windows of {length}={max_length} tokens keep up to {question}="
            f"{max_question_tokens} question tokens, leaving {room} context tokens, so the "
            f"stride must be below {room}, in [0, {room}): lower {overlap} or {question}, or "
            f"raise {length}.",
        ),
    )
    return next(((key, value, fix) for ok, key, value, fix in rules if not ok), None)


def context_sequence_id(tokenizer: Any) -> int:
    """Index of the context in the (question, context) pair: 1 when padding on the right."""
    return 1 if tokenizer.padding_side == "right" else 0


def label_window(
    offsets: np.ndarray,
    sequence_ids: Sequence[int | None],
    context_id: int,
    start_char: int,
    end_char: int,
    cls_index: int,
) -> tuple[int, int]:
    """Token span ``(start, end)`` (inclusive) covering characters ``[start_char, end_char)``.

    Returns ``(cls_index, cls_index)`` when the window's context does not wholly contain the answer.
    The start token is the last context token starting at or before ``start_char``; the end token
    the first context token ending at or after ``end_char``.
    """
    in_context = np.fromiter((s == context_id for s in sequence_ids), dtype=bool)
    context_tokens = np.flatnonzero(in_context)
    if context_tokens.size == 0:
        return cls_index, cls_index
    starts = offsets[context_tokens, 0]
    ends = offsets[context_tokens, 1]
    if starts[0] > start_char or ends[-1] < end_char:
        return cls_index, cls_index
    start_token = context_tokens[starts <= start_char][-1]
    end_token = context_tokens[ends >= end_char][0]
    return int(start_token), int(end_token)


def answer_end(context: str, start_char: int, end_char: int) -> int:
    """End of the answer without trailing characters that no token covers.

    Tokenizers drop combining marks (accent stripping), format characters and white space from
    their offsets, so an answer ending in one would otherwise never fit in a window.
    """
    while end_char > start_char and (
        context[end_char - 1].isspace()
        or unicodedata.category(context[end_char - 1]) in ("Mn", "Me", "Cf")
    ):
        end_char -= 1
    return end_char


def _tokenize_pairs(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    stride: int,
    pad_to_max_length: bool,
) -> Any:
    question_first = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in questions]
    return tokenizer(
        questions if question_first else contexts,
        contexts if question_first else questions,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )


def _cls_index(input_ids: Sequence[int], cls_token_id: int | None) -> int:
    if cls_token_id is not None and cls_token_id in input_ids:
        return input_ids.index(cls_token_id)
    return 0


def make_train_windows(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    answers: Sequence[dict[str, list]],
    max_length: int,
    stride: int,
    pad_to_max_length: bool = False,
) -> dict[str, list]:
    """Tokenise examples into labelled training windows.

    ``answers[i]`` is ``{"text": [...], "answer_start": [...]}``; the first answer is the label
    (the reference recipe's choice). An example with no answer (SQuAD v2) labels every window CLS.
    Returns columns ``input_ids``, ``attention_mask`` (``token_type_ids`` when the tokenizer has
    them), ``start_positions``, ``end_positions``, ``length`` and ``example_index`` (position of
    the window's example in the input batch).
    """
    encoded = _tokenize_pairs(tokenizer, questions, contexts, max_length, stride, pad_to_max_length)
    context_id = context_sequence_id(tokenizer)
    windows: dict[str, list] = {key: [] for key in encoded if key != "offset_mapping"}
    windows.pop("overflow_to_sample_mapping", None)
    windows.update(start_positions=[], end_positions=[], length=[], example_index=[])
    for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        for key in windows.keys() & encoded.keys():
            windows[key].append(encoded[key][i])
        input_ids = encoded["input_ids"][i]
        cls_index = _cls_index(input_ids, tokenizer.cls_token_id)
        answer = answers[example_index]
        if len(answer["answer_start"]) == 0:
            start, end = cls_index, cls_index
        else:
            start_char = answer["answer_start"][0]
            end_char = start_char + len(answer["text"][0])
            end_char = answer_end(contexts[example_index], start_char, end_char)
            start, end = label_window(
                np.asarray(encoded["offset_mapping"][i]),
                encoded.sequence_ids(i),
                context_id,
                start_char,
                end_char,
                cls_index,
            )
        windows["start_positions"].append(start)
        windows["end_positions"].append(end)
        windows["length"].append(int(sum(encoded["attention_mask"][i])))
        windows["example_index"].append(example_index)
    return windows


def make_eval_windows(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    stride: int,
    pad_to_max_length: bool = False,
) -> dict[str, list]:
    """Tokenise examples into evaluation windows.

    Each window keeps ``example_index`` (position of its example in the input batch) and an
    ``offset_mapping`` of ``[start, end)`` character offsets into the context, with
    ``(NO_OFFSET, NO_OFFSET)`` for tokens outside the context, so that windows collate into tensors.
    """
    encoded = _tokenize_pairs(tokenizer, questions, contexts, max_length, stride, pad_to_max_length)
    context_id = context_sequence_id(tokenizer)
    windows: dict[str, list] = {key: [] for key in encoded if key != "overflow_to_sample_mapping"}
    windows.update(example_index=[], length=[])
    for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        for key in windows.keys() & encoded.keys():
            if key != "offset_mapping":
                windows[key].append(encoded[key][i])
        sequence_ids = encoded.sequence_ids(i)
        windows["offset_mapping"].append(
            [
                list(offset) if sequence_ids[t] == context_id else [NO_OFFSET, NO_OFFSET]
                for t, offset in enumerate(encoded["offset_mapping"][i])
            ]
        )
        windows["example_index"].append(example_index)
        windows["length"].append(int(sum(encoded["attention_mask"][i])))
    return windows


def window_text(context: str, offsets: np.ndarray, start: int, end: int) -> str:
    """Context text covered by tokens ``start..end`` (inclusive) through their offsets."""
    return context[int(offsets[start][0]) : int(offsets[end][1])]


def truncate_questions(
    tokenizer: Any, questions: Sequence[str], max_tokens: int
) -> tuple[list[str], list[int]]:
    """Cut questions longer than ``max_tokens`` tokens at their ``max_tokens``-th token.

    Returns the questions and the positions of those that were cut. Only questions that could be
    that long are tokenised: a token covers at least one UTF-8 byte (one more for a word-start
    marker), so a question of at most ``max_tokens - 1`` bytes cannot exceed the limit.
    """
    kept = list(questions)
    long = [i for i, q in enumerate(questions) if len(q.lstrip().encode()) + 1 > max_tokens]
    if not long:
        return kept, []
    encoded = tokenizer(
        [questions[i].lstrip() for i in long], add_special_tokens=False, return_offsets_mapping=True
    )
    cut = []
    for i, offsets in zip(long, encoded["offset_mapping"], strict=True):
        if len(offsets) > max_tokens:
            kept[i] = questions[i].lstrip()[: offsets[max_tokens - 1][1]]
            cut.append(i)
    return kept, cut
