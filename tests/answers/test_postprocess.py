"""Post-processing on hand-made logits.

The hand-made window is ``[CLS] q [SEP] a b c d e f [SEP]`` (tokens 0..9) over the context
``"a b c d e f"``: context token ``t`` (3..8) spans characters ``[2(t - 3), 2(t - 3) + 1)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qa_lightning.answers.postprocess import answer_texts, best_example_spans, best_window_spans
from qa_lightning.data.windowing import NO_OFFSET

CONTEXT = "a b c d e f"
NO = [NO_OFFSET, NO_OFFSET]
OFFSETS = [NO, NO, NO] + [[2 * i, 2 * i + 1] for i in range(6)] + [NO]


def logits(default=-10.0, **values):
    """Logits of the 10-token window: ``t3=5.0`` sets token 3."""
    row = [default] * 10
    for name, value in values.items():
        row[int(name[1:])] = value
    return torch.tensor([row])


def best(start, end, offsets=None, **kwargs):
    offsets = torch.tensor([offsets or OFFSETS])
    spans = best_window_spans(start, end, offsets, **kwargs)
    return spans.scores[0].tolist(), spans.start_chars[0].tolist(), spans.end_chars[0].tolist()


def test_best_span_maximises_start_plus_end_and_skips_end_before_start():
    # pairs: (5, 4) invalid; (3, 4) = 4 + 6 = 10; (5, 6) = 5 + 3 = 8; (3, 6) = 7
    scores, starts, ends = best(logits(t5=5.0, t3=4.0), logits(t4=6.0, t6=3.0))
    assert scores == [10.0]
    assert CONTEXT[starts[0] : ends[0]] == "a b"


def test_tokens_outside_the_context_are_never_chosen():
    start = logits(t0=100.0, t1=50.0, t9=80.0, t4=1.0)
    end = logits(t9=100.0, t0=90.0, t2=70.0, t6=1.0)
    scores, starts, ends = best(start, end)
    assert scores == [2.0]
    assert CONTEXT[starts[0] : ends[0]] == "b c d"


@pytest.mark.parametrize(
    ("max_answer_length", "text", "score"),
    [(3, "a b", 6.0), (5, "a b", 6.0), (6, "a b c d e f", 10.0), (30, "a b c d e f", 10.0)],
)
def test_max_answer_length(max_answer_length, text, score):
    # (3, 8) spans 6 tokens and scores 10; (3, 4) spans 2 and scores 6
    start, end = logits(t3=5.0), logits(t8=5.0, t4=1.0)
    scores, starts, ends = best(start, end, max_answer_length=max_answer_length)
    assert scores == [score]
    assert CONTEXT[starts[0] : ends[0]] == text


@pytest.mark.parametrize(("n_best", "text", "score"), [(2, "e f", 11.0), (3, "a b", 18.0)])
def test_candidates_come_from_the_n_best_starts_and_ends(n_best, text, score):
    # top starts 7, 8, 3; top ends 4, 8. The best pair (3, 4) = 18 needs the 3rd best start:
    # with n_best=2 only (7, 8) = 11 and (8, 8) = 10 are valid.
    start, end = logits(t7=10.0, t8=9.0, t3=8.0), logits(t4=10.0, t8=1.0)
    scores, starts, ends = best(start, end, n_best=n_best)
    assert scores == [score]
    assert CONTEXT[starts[0] : ends[0]] == text


def test_window_without_valid_candidate_scores_minus_inf():
    start = torch.cat([logits(t8=5.0), logits(t3=1.0), logits(t3=1.0)])
    end = torch.cat([logits(t3=5.0), logits(t3=1.0), logits(t3=1.0)])
    offsets = torch.tensor([OFFSETS, OFFSETS, [NO] * 10])
    # window 0: with n_best=1 the only pair ends before it starts; window 2: no context at all
    spans = best_window_spans(start, end, offsets, n_best=1)
    assert spans.scores[:, 0].tolist() == [-math.inf, 2.0, -math.inf]
    assert (spans.start_chars[1, 0].item(), spans.end_chars[1, 0].item()) == (0, 1)


def test_top_k_ordered_by_score():
    # (3, 5) = 6, (4, 5) = 5, (3, 6) = 4, (4, 6) = 3
    scores, starts, ends = best(logits(t3=3.0, t4=2.0), logits(t5=3.0, t6=1.0), top_k=3)
    assert scores == [6.0, 5.0, 4.0]
    assert [CONTEXT[s:e] for s, e in zip(starts, ends, strict=True)] == ["a b c", "b c", "a b c d"]


# -- examples -----------------------------------------------------------------------------------

# windows: (example_index, score, start_char, end_char)
WINDOWS = [(0, 1.0, 10, 12), (1, 5.0, 3, 4), (0, 3.0, 20, 25), (2, -math.inf, 7, 9), (0, 2.0, 1, 2)]
EXPECTED = ([3.0, 5.0, -math.inf, -math.inf], [20, 3, 0, 0], [25, 4, 0, 0])


def example_spans(windows):
    columns = [np.array(c) for c in zip(*windows, strict=True)]
    scores, starts, ends = best_example_spans(*columns, num_examples=4)
    return scores.tolist(), starts.tolist(), ends.tolist()


def test_best_window_wins_per_example():
    # example 2 has only an invalid window, example 3 none at all
    assert example_spans(WINDOWS) == EXPECTED


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(WINDOWS))))[::7])
def test_window_order_and_duplicates_do_not_matter(order):
    windows = [WINDOWS[i] for i in order]
    assert example_spans(windows) == EXPECTED
    assert example_spans(windows + windows[:3] + windows) == EXPECTED  # DDP padding repeats


def test_answer_texts():
    contexts = ["the river Thames", "abc", "x"]
    texts = answer_texts(contexts, np.array([4, 0, 0]), np.array([16, 0, 1]))
    assert texts == ["river Thames", "", "x"]


# -- cross-check against the reference double loop ----------------------------------------------


def reference_window_span(start_logits, end_logits, offsets, n_best, max_answer_length):
    """``utils_qa.postprocess_qa_predictions`` for one window: (score, start_char, end_char)."""
    start_indexes = np.argsort(start_logits)[-1 : -n_best - 1 : -1].tolist()
    end_indexes = np.argsort(end_logits)[-1 : -n_best - 1 : -1].tolist()
    best = (-math.inf, 0, 0)
    for s in start_indexes:
        for e in end_indexes:
            if offsets[s][0] == NO_OFFSET or offsets[e][0] == NO_OFFSET:
                continue
            if e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


def random_windows(rng, n_windows, n_tokens):
    offsets = np.full((n_windows, n_tokens, 2), NO_OFFSET)
    for w in range(n_windows):
        first = int(rng.integers(2, 12))  # [CLS] question [SEP]
        n_context = int(rng.integers(0, n_tokens - first)) if w % 10 else 0  # [SEP], padding
        starts = np.cumsum(rng.integers(1, 5, size=n_context))
        offsets[w, first : first + n_context, 0] = starts
        offsets[w, first : first + n_context, 1] = starts + rng.integers(1, 4, size=n_context)
    start_logits = rng.standard_normal((n_windows, n_tokens)).astype(np.float32)
    end_logits = rng.standard_normal((n_windows, n_tokens)).astype(np.float32)
    return start_logits, end_logits, offsets


@pytest.mark.parametrize(("n_best", "max_answer_length"), [(20, 30), (20, 5), (4, 3)])
def test_matches_reference_double_loop(n_best, max_answer_length):
    rng = np.random.default_rng(n_best * 100 + max_answer_length)
    start_logits, end_logits, offsets = random_windows(rng, 100, 48)
    spans = best_window_spans(
        torch.from_numpy(start_logits),
        torch.from_numpy(end_logits),
        torch.from_numpy(offsets),
        n_best=n_best,
        max_answer_length=max_answer_length,
    )
    expected = [
        reference_window_span(s, e, o, n_best, max_answer_length)
        for s, e, o in zip(start_logits, end_logits, offsets, strict=True)
    ]
    actual = zip(
        spans.scores[:, 0].tolist(),
        spans.start_chars[:, 0].tolist(),
        spans.end_chars[:, 0].tolist(),
        strict=True,
    )
    n_valid = 0
    for (score, start, end), (ref_score, ref_start, ref_end) in zip(actual, expected, strict=True):
        if ref_score == -math.inf:
            assert score == -math.inf
            continue
        n_valid += 1
        assert score == pytest.approx(float(ref_score))
        assert (start, end) == (ref_start, ref_end)
    assert 0 < n_valid < 100  # both kinds of window occur

    # examples: the best window of each, as a loop over windows would pick it
    example_index = rng.integers(0, 40, size=100)
    scores, starts, ends = best_example_spans(
        example_index,
        spans.scores[:, 0].numpy(),
        spans.start_chars[:, 0].numpy(),
        spans.end_chars[:, 0].numpy(),
        num_examples=40,
    )
    for example in range(40):
        candidates = [expected[w] for w in np.flatnonzero(example_index == example)]
        ref = max(candidates, key=lambda c: c[0], default=(-math.inf, 0, 0))
        if ref[0] == -math.inf:
            ref = (-math.inf, 0, 0)
        assert scores[example] == pytest.approx(float(ref[0]))
        assert (starts[example], ends[example]) == ref[1:]


def test_tied_candidates_are_taken_in_token_order_whatever_the_padding():
    """int8 logits tie often: the candidates kept (``n_best``) and the answers ranked must not
    depend on how long the batch padded the window."""
    start = logits(t3=2.0, t4=2.0, t5=2.0, t6=2.0)
    end = logits(t5=1.0, t6=1.0, t7=1.0, t8=1.0)
    found = []
    for padding in (0, 1, 7, 300):
        pad = torch.full((1, padding), -1e9)
        offsets = OFFSETS + [NO] * padding
        found.append(
            best(torch.cat([start, pad], 1), torch.cat([end, pad], 1), offsets, n_best=2, top_k=3)
        )
    # n_best=2 keeps starts 3, 4 and ends 5, 6 (token order); the best span is (3, 5)
    assert found[0] == ([3.0, 3.0, 3.0], [0, 0, 2], [5, 7, 5])
    assert all(result == found[0] for result in found)
