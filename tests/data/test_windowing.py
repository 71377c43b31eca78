"""Windowing against hand-counted tokens.

The contexts are single-letter words (one wordpiece each): in ``LETTERS`` letter ``i`` is token
``i`` of the context and spans characters ``[2i, 2i + 1)``. With the one-token question ``"q"`` a
window is ``[CLS] q [SEP] <context tokens> [SEP]``, so context token ``i`` of a window whose
context starts at token ``w`` sits at position ``3 + i - w``.
"""

from __future__ import annotations

import numpy as np
import pytest

from qa_lightning.data.windowing import (
    NO_OFFSET,
    label_window,
    make_eval_windows,
    make_train_windows,
    truncate_questions,
    window_text,
)

LETTERS = " ".join("abcdefghijklmnop")  # 16 tokens
SHALOM_POINTED = "\u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd"


def answer(context, text):
    return {"text": [text], "answer_start": [context.index(text)]}


def train_labels(tokenizer, text, max_length=10, stride=2, context=LETTERS):
    windows = make_train_windows(
        tokenizer, ["q"], [context], [answer(context, text)], max_length, stride
    )
    return list(zip(windows["start_positions"], windows["end_positions"], strict=True))


# -- label_window on hand-written offsets -------------------------------------------------------

# [CLS] what ? [SEP] the river [SEP] [PAD]; context "the river" -> "the" [0, 3), "river" [4, 9)
OFFSETS = np.array([[0, 0], [0, 4], [4, 5], [0, 0], [0, 3], [4, 9], [0, 0], [0, 0]])
SEQUENCE_IDS = [None, 0, 0, None, 1, 1, None, None]


@pytest.mark.parametrize(
    ("start_char", "end_char", "expected"),
    [
        (0, 3, (4, 4)),  # "the"
        (4, 9, (5, 5)),  # "river": the last context token; [SEP] and [PAD] have offset (0, 0)
        (0, 9, (4, 5)),  # whole context
        (5, 7, (5, 5)),  # "iv": inside a token -> that token
        (2, 6, (4, 5)),  # "e ri": across tokens
        (4, 10, (0, 0)),  # ends after the context -> CLS
    ],
)
def test_label_window_hand_offsets(start_char, end_char, expected):
    assert label_window(OFFSETS, SEQUENCE_IDS, 1, start_char, end_char, cls_index=0) == expected


def test_label_window_outside_window_gives_cls_index():
    # window of a longer context covering characters [10, 20): tokens [10, 14) and [15, 20)
    offsets = np.array([[0, 0], [0, 1], [0, 0], [10, 14], [15, 20], [0, 0]])
    sequence_ids = [None, 0, None, 1, 1, None]
    assert label_window(offsets, sequence_ids, 1, 5, 12, cls_index=0) == (0, 0)  # starts before
    assert label_window(offsets, sequence_ids, 1, 15, 21, cls_index=0) == (0, 0)  # ends after
    assert label_window(offsets, sequence_ids, 1, 15, 20, cls_index=0) == (4, 4)
    assert label_window(offsets, [None, 0, None, 0, 0, None], 1, 15, 20, cls_index=5) == (5, 5)


def test_label_window_context_first():
    # padding on the left: context is sequence 0, e.g. "the river" [SEP] what [SEP]
    offsets = np.array([[0, 0], [0, 3], [4, 9], [0, 0], [0, 4], [0, 0]])
    sequence_ids = [None, 0, 0, None, 1, None]
    assert label_window(offsets, sequence_ids, 0, 4, 9, cls_index=0) == (2, 2)


# -- training windows -------------------------------------------------------------------------
# max_length=10, stride=2: 6 context tokens per window, each window starts 4 tokens after the
# previous one: a-f, e-j, i-n, m-p.


def test_train_windows_tokens_and_columns(tokenizer):
    context = LETTERS
    windows = make_train_windows(tokenizer, ["q"], [context], [answer(context, "b c")], 10, 2)
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in windows["input_ids"]]
    assert tokens == [
        ["[CLS]", "q", "[SEP]", *"abcdef", "[SEP]"],
        ["[CLS]", "q", "[SEP]", *"efghij", "[SEP]"],
        ["[CLS]", "q", "[SEP]", *"ijklmn", "[SEP]"],
        ["[CLS]", "q", "[SEP]", *"mnop", "[SEP]"],
    ]
    assert windows["length"] == [10, 10, 10, 8]
    assert windows["example_index"] == [0, 0, 0, 0]
    assert windows["token_type_ids"][3] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert "offset_mapping" not in windows
    assert "overflow_to_sample_mapping" not in windows


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("b c", [(4, 5), (0, 0), (0, 0), (0, 0)]),  # inside window 0 only
        ("g h", [(0, 0), (5, 6), (0, 0), (0, 0)]),  # inside window 1 only
        ("e f", [(7, 8), (3, 4), (0, 0), (0, 0)]),  # ends on window 0's last context token
        ("f", [(8, 8), (4, 4), (0, 0), (0, 0)]),  # last context token of window 0
        ("p", [(0, 0), (0, 0), (0, 0), (6, 6)]),  # last context token, followed by [SEP]
        ("a", [(3, 3), (0, 0), (0, 0), (0, 0)]),  # first context token
        ("f g", [(0, 0), (4, 5), (0, 0), (0, 0)]),  # split by window 0, whole in window 1
        ("d e f g", [(0, 0), (0, 0), (0, 0), (0, 0)]),  # in no window wholly
    ],
)
def test_train_window_labels(tokenizer, text, expected):
    assert train_labels(tokenizer, text) == expected


def test_train_label_is_first_answer_and_unanswerable_is_cls(tokenizer):
    context = "a b c"
    answers = [
        {"text": ["c", "b"], "answer_start": [4, 2]},
        {"text": [], "answer_start": []},
    ]
    windows = make_train_windows(tokenizer, ["q", "q"], [context, context], answers, 32, 8)
    assert windows["start_positions"] == [5, 0]
    assert windows["end_positions"] == [5, 0]


@pytest.mark.parametrize(
    ("question", "max_length", "stride", "first_tokens"),
    [
        # context tokens per window = max_length - 3 - question tokens; step = that - stride
        ("q", 10, 2, "aeim"),  # 6 per window, step 4
        ("q", 10, 0, "agm"),  # 6, step 6
        ("q", 10, 1, "afk"),  # 6, step 5: the third window ends exactly on "p"
        ("q", 12, 3, "afk"),  # 8, step 5
        ("q r", 10, 2, "adgjm"),  # 5, step 3
        ("q", 19, 4, "al"),  # 15, step 11: one token short of a single window
        ("q", 20, 4, "a"),  # 16: the whole context fits
    ],
)
def test_number_of_windows(tokenizer, question, max_length, stride, first_tokens):
    windows = make_eval_windows(tokenizer, [question], [LETTERS], max_length, stride)
    n_question = len(question.split())
    per_window = max_length - 3 - n_question
    assert len(windows["input_ids"]) == len(first_tokens)
    for w, (ids, first) in enumerate(zip(windows["input_ids"], first_tokens, strict=True)):
        context_tokens = tokenizer.convert_ids_to_tokens(ids)[2 + n_question : -1]
        assert context_tokens[0] == first
        assert len(context_tokens) == min(per_window, 16 - w * (per_window - stride))
    assert context_tokens[-1] == "p"


# -- unicode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "text"),
    [
        ("Le café est noir.", "café"),  # precomposed é, stripped to "cafe" by the tokenizer
        ("Il a dit à Zoë bonjour.", "Zoë"),
        ("un cafe\u0301 noir svp", "cafe\u0301 noir"),  # combining acute inside the answer
        ("un cafe\u0301 noir svp", "noir"),  # after a dropped combining mark
        (f"x {SHALOM_POINTED} y", SHALOM_POINTED),  # Hebrew with vowel points (combining)
        ("☕ coffee at 9 ☕", "coffee at 9"),
        ("😀😀 the answer is 42 😀", "42"),  # astral emoji: offsets count code points
        ("מה שלום עולם?", "שלום עולם"),  # Hebrew
        ("قال مرحبا بالعالم", "مرحبا"),  # Arabic
        ("He said مرحبا and שלום to the crowd", "שלום to the"),  # mixed directions
    ],
)
def test_unicode_labels_slice_back_to_answer(tokenizer, context, text):
    windows = make_train_windows(tokenizer, ["q"], [context], [answer(context, text)], 64, 16)
    evals = make_eval_windows(tokenizer, ["q"], [context], 64, 16)
    (start,), (end,) = windows["start_positions"], windows["end_positions"]
    assert start > 0
    assert window_text(context, np.asarray(evals["offset_mapping"][0]), start, end) == text


@pytest.mark.parametrize("context", ["le cafe\u0301 noir", "le cafe\u0301"])
def test_answer_ending_in_combining_mark(tokenizer, context):
    text = "cafe\u0301"
    windows = make_train_windows(tokenizer, ["q"], [context], [answer(context, text)], 64, 16)
    assert (windows["start_positions"], windows["end_positions"]) == ([4], [4])


# -- evaluation windows -------------------------------------------------------------------------


def test_eval_windows_offsets(tokenizer):
    # question " q r" (leading space stripped): 5 context tokens per window, step 3
    windows = make_eval_windows(tokenizer, [" q r"], [LETTERS], 10, 2, pad_to_max_length=True)
    no = [NO_OFFSET, NO_OFFSET]
    offsets = windows["offset_mapping"]
    assert len(offsets) == 5
    assert offsets[0] == [no] * 4 + [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] + [no]
    assert offsets[1] == [no] * 4 + [[6, 7], [8, 9], [10, 11], [12, 13], [14, 15]] + [no]
    # last window: m n o p, then [SEP] and one padding token
    assert offsets[4] == [no] * 4 + [[24, 25], [26, 27], [28, 29], [30, 31]] + [no, no]
    assert windows["input_ids"][4][-1] == tokenizer.pad_token_id
    assert windows["attention_mask"][4] == [1] * 9 + [0]
    assert windows["length"] == [10, 10, 10, 10, 9]
    for window in offsets:
        for start, end in window:
            if start != NO_OFFSET:
                assert LETTERS[start:end].isalpha() and end == start + 1


def test_eval_windows_example_index(tokenizer):
    contexts = ["a b", LETTERS, "c d e"]  # 1, 4 and 1 windows with max_length 10, stride 2
    windows = make_eval_windows(tokenizer, ["q", "q", "q"], contexts, 10, 2)
    assert windows["example_index"] == [0, 1, 1, 1, 1, 2]
    assert windows["offset_mapping"][0][3:5] == [[0, 1], [2, 3]]
    assert windows["offset_mapping"][5][3:6] == [[0, 1], [2, 3], [4, 5]]


def test_train_windows_example_index(tokenizer):
    contexts = [LETTERS, "x y"]
    answers = [answer(LETTERS, "o"), answer("x y", "y")]
    windows = make_train_windows(tokenizer, ["q", "q"], contexts, answers, 10, 2)
    assert windows["example_index"] == [0, 0, 0, 0, 1]
    assert windows["start_positions"] == [0, 0, 0, 5, 4]


def test_window_text():
    context = "the river Thames"
    offsets = np.array([[-1, -1], [0, 3], [4, 9], [10, 16]])
    assert window_text(context, offsets, 2, 3) == "river Thames"
    assert window_text(context, offsets, 1, 1) == "the"


# -- long questions -----------------------------------------------------------------------------


def test_truncate_questions(tokenizer):
    questions = [
        "what is the name of the river?",  # 8 tokens
        "who?",  # who ? : 2 tokens
        "  which tokenization scheme",  # which token ##ization scheme: 4 tokens
        "a b c",  # exactly 3 tokens: kept
    ]
    kept, cut = truncate_questions(tokenizer, questions, 3)
    assert kept == ["what is the", "who?", "which tokenization", "a b c"]
    assert cut == [0, 2]
    kept, cut = truncate_questions(tokenizer, questions, 2)
    assert kept == ["what is", "who?", "which token", "a b"]
    assert cut == [0, 2, 3]
    assert all(len(tokenizer.tokenize(q)) == 2 for q in kept)


def test_truncate_questions_cuts_exactly_the_questions_over_the_limit(tokenizer):
    questions = [
        "who?",
        " " + "word " * 9,  # 9 tokens
        "word " * 10,  # 10 tokens: at the limit
        "word " * 11,  # 11 tokens
        "🙂" * 12,  # 12 characters, 48 bytes
        "a-b-c-d-e-f",  # 11 tokens in 11 bytes
    ]
    full = [len(tokenizer(q.lstrip(), add_special_tokens=False)["input_ids"]) for q in questions]
    kept, cut = truncate_questions(tokenizer, questions, 10)
    assert cut == [i for i, n in enumerate(full) if n > 10] == [3, 5]
    assert [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in kept[3:6:2]] == [
        10,
        10,
    ]
    assert kept[:3] == questions[:3]
