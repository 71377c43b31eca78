"""Bad data files and records are reported by file, line and record id before the model loads;
``data.on_bad_record=skip`` trains on the rest; long questions, 100k-character contexts and
unicode (combining marks, emoji, right-to-left text) train and answer with exact offsets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.config import resource_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.config import validate_data_config
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import (
    PAIR_SPECIAL_TOKENS,
    make_eval_windows,
    make_train_windows,
    truncate_questions,
    window_text,
)
from qa_lightning.train import train
from tests.conftest import TINY_OVERRIDES
from tests.test_errors import _short_errors, cli_error, in_process_error, run_cli  # noqa: F401

DEMO_VALIDATION = resource_path("demo/validation.json")


def record(qid: str, context: str, question: str, answer: str, start: int | None = None) -> dict:
    start = context.find(answer) if start is None else start
    return {
        "id": qid,
        "title": "t",
        "context": context,
        "question": question,
        "answers": {"text": [answer], "answer_start": [start]},
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


GOOD = [
    record(f"good-{i}", f"The bridge number {i} was built in {1900 + i}.", "When?", str(1900 + i))
    for i in range(6)
]
BAD = [
    record("shifted", "The river is long.", "What is long?", "river", start=0),
    record("outside", "Short.", "What?", "Short. And more", start=0),
    record("no-context", "   ", "What?", "x", start=0),
    record("no-question", "Some context.", "", "Some"),
    record("good-0", "A duplicate id.", "Which?", "duplicate"),
]


def train_on(compose_train, train_file: Path | str, *overrides: str):
    return compose_train(
        [
            *TINY_OVERRIDES,
            f"data.train_file={train_file}",
            f"data.validation_file={DEMO_VALIDATION}",
            *overrides,
        ]
    )


# -- real CLI ----------------------------------------------------------------------------------


def test_cli_lists_every_bad_record_by_id(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", GOOD + BAD)
    message = cli_error(
        run_cli(
            "qa_lightning.train",
            *TINY_OVERRIDES,
            f"data.train_file={data}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ),
        f"6 bad record(s) of {len(GOOD + BAD)} in '{data}'",
        "shifted: answer 'river' is not at answer_start 0 (context has 'The r' there)",
        "outside: answer 'Short. And more' at 0 lies outside the context (6 chars)",
        "no-context: empty context",
        "no-question: empty question",
        "good-0: id appears 2 times",
        "data.on_bad_record=skip",
    )
    assert "Traceback" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    data = tmp_path / "train.json"
    data.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}\n')
    cli_error(
        run_cli(
            "qa_lightning.train",
            *TINY_OVERRIDES,
            f"data.train_file={data}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ),
        f"data file '{data}' is not valid JSON",
        "line 3, column 19",
        "use .jsonl for one record per line",
    )


# -- in process --------------------------------------------------------------------------------


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("t.jsonl", '{"id": "a"}\n\n{"id": oops}\n', ["line 3 is not valid JSON"]),
        ("t.json", "", ["is not valid JSON: Expecting value at line 1, column 1"]),
        ("t.json", '{"version": 1}', ["not in the SQuAD layout", '"data" list']),
        (
            "t.json",
            '{"data": [{"title": "A", "paragraphs": [{"qas": [{"id": "1", "question": "q"}]}]}]}',
            ["article 0 ('A') lacks field 'context'"],
        ),
        ("t.parquet", b"PAR1 not really", ["is not a readable parquet file"]),
        ("t.csv", "id,question\n", ["unsupported extension '.csv'"]),
        (
            "t.jsonl",
            '{"id": "q7", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}\n',
            ["record 'q7' (position 0) lacks field(s) ['question']"],
        ),
        (
            "t.jsonl",
            '{"id": "q8", "context": "c", "question": "q", "answers": {"text": ["c"]}}\n',
            ["record 'q8' has malformed answers", "answer_start"],
        ),
        ("t.jsonl", "[1, 2]\n", ["record 0 is not an object"]),
        ("t.jsonl", "\n\n", ["holds no questions"]),
        (
            "t.jsonl",
            b'{"id": "a", "context": "caf\xe9", "question": "q", "answers": []}\n',
            ["is not valid UTF-8 (byte 27: b'\\xe9", "Re-encode it as UTF-8"],
        ),
    ],
)
def test_invalid_files_name_the_file_and_where(
    compose_train, capsys, tmp_path: Path, name: str, content: str | bytes, fragments: list[str]
) -> None:
    data = _write(tmp_path / name, content)
    cfg = train_on(compose_train, data)
    in_process_error(capsys, lambda: train(cfg), f"'{data}'", *fragments)


def test_unreadable_file_is_a_clear_error(compose_train, capsys, monkeypatch, tmp_path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    cfg = train_on(compose_train, data)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    in_process_error(
        capsys, lambda: train(cfg), f"cannot read data file '{data}': Permission denied"
    )


@pytest.fixture
def bad_and_good(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", GOOD + BAD)


def test_skip_keeps_every_good_record(compose_train, bad_and_good: Path, caplog) -> None:
    cfg = train_on(
        compose_train, bad_and_good, "data.on_bad_record=skip", "+trainer.fast_dev_run=1"
    )
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    # both records with id good-0 are dropped (which one is meant cannot be known); the
    # skipped ids are counted
    assert metrics["skipped_records"] == {"train": 5, "validation": 0}
    assert metrics["train_questions"] == len(GOOD) - 1
    assert "skipping 6 bad record(s) of 11" in caplog.text
    assert "shifted: answer 'river' is not at answer_start 0" in caplog.text


# -- long questions, long contexts, unicode ----------------------------------------------------

LONG_QUESTION = "Which of the many bridges " + "across the wide river " * 60 + "was built first?"
UNICODE = [
    record("combining", "Le cafe\u0301 noir est servi a\u0300 midi.", "Quoi?", "cafe\u0301 noir"),
    record("precomposed", "Zoë a bu un café très chaud.", "Qui?", "Zoë"),
    record("emoji", "😀😀 the answer is 42 😀 and 👍🏽 too", "What is it?", "42"),
    record("emoji-answer", "Thumbs 👍🏽 up and ☕ coffee", "What?", "☕ coffee"),
    record("hebrew", "מה שלום עולם? הכל טוב", "מה?", "שלום עולם"),
    record("arabic", "قال مرحبا بالعالم اليوم", "ماذا قال؟", "مرحبا"),
    record("mixed", "He said مرحبا and שלום to the crowd", "What?", "שלום to the"),
]


def long_context_record(chars: int = 120_000) -> dict:
    filler = "The committee met again and discussed the bridge at length. "
    context = (
        filler * (chars // len(filler)) + "Finally the bridge was opened in 1931 by the mayor."
    )
    return record("long", context, "When was the bridge opened?", "1931")


def test_long_question_is_truncated_with_a_warning_and_trains(compose_train, tmp_path, caplog):
    """A question of ~250 tokens, twice data.max_length: truncated to data.max_question_tokens;
    the largest stride allowed (59 for 128 - 64 - 4) does not make the tokenizer panic."""
    records = [*GOOD, record("long-question", GOOD[0]["context"], LONG_QUESTION, "1900")]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = train_on(
        compose_train,
        data,
        f"data.validation_file={data}",
        "data.stride=59",
        "+trainer.fast_dev_run=1",
    )
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert "question(s) longer than data.max_question_tokens=64 tokens were truncated" in (
        caplog.text
    )
    assert "long-question" in caplog.text
    assert metrics["train_questions"] == len(records)
    assert metrics["skipped_records"] == {"train": 0, "validation": 0}


def test_unicode_and_100k_character_contexts_train_with_exact_offsets(
    compose_train, tmp_path, tokenizer
) -> None:
    records = [*UNICODE, long_context_record()]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = train_on(compose_train, data, f"data.validation_file={data}", "+trainer.fast_dev_run=2")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # record checks pass: every answer is exactly at answer_start
    assert datamodule.skipped == {"train": {}, "validation": {}}
    windows_per_example = np.bincount(datamodule.train_windows["example_index"])
    assert windows_per_example[-1] > 200  # the 120k-character context: just more windows

    examples = load_local_file(data)
    questions, contexts = examples["question"][:], examples["context"][:]
    train_windows = make_train_windows(
        tokenizer, questions, contexts, examples["answers"][:], 128, 32
    )
    eval_windows = make_eval_windows(tokenizer, questions, contexts, 128, 32)
    assert train_windows["example_index"] == eval_windows["example_index"]
    found = set()
    for i, example in enumerate(train_windows["example_index"]):
        start, end = train_windows["start_positions"][i], train_windows["end_positions"][i]
        if start == 0:  # CLS: the answer is not in this window
            continue
        offsets = np.asarray(eval_windows["offset_mapping"][i])
        text = window_text(contexts[example], offsets, start, end)
        assert text == examples["answers"][example]["text"][0], examples["id"][example]
        found.add(example)
    assert found == set(range(len(records)))  # every answer labelled in some window

    metrics = train(cfg)  # and the whole pipeline runs on them
    assert metrics["train_windows"] == len(train_windows["input_ids"])


@pytest.mark.parametrize(
    ("max_length", "max_question_tokens"), [(32, 8), (40, 35), (64, 40), (128, 64), (384, 64)]
)
def test_the_largest_stride_the_checks_allow_never_makes_the_tokenizer_panic(
    tokenizer, max_length: int, max_question_tokens: int
) -> None:
    """The tokenizer panics (a Rust ``PanicException``, not an ``Exception``) when the stride is
    not below the context tokens a window has left; training's and predict's checks allow only
    strides below that room, for any question once it is cut to ``max_question_tokens``."""
    stride = max_length - max_question_tokens - PAIR_SPECIAL_TOKENS - 1
    data = {
        "max_length": max_length,
        "stride": stride,
        "max_question_tokens": max_question_tokens,
        "batch_size": 8,
        "eval_batch_size": 8,
        "on_bad_record": "error",
        "train_file": DEMO_VALIDATION,
        "validation_file": DEMO_VALIDATION,
    }
    validate_data_config(OmegaConf.create(data))
    InferenceSettings(max_length, stride, max_question_tokens)
    with pytest.raises(ConfigError, match="data.stride"):
        validate_data_config(OmegaConf.create({**data, "stride": stride + 1}))
    with pytest.raises(ConfigError, match="invalid setting stride"):
        InferenceSettings(max_length, stride + 1, max_question_tokens)

    questions = [
        LONG_QUESTION,
        "supercalifragilisticexpialidocious antidisestablishmentarianism " * 40,
        "😀 مرحبا שלום cafe\u0301 " * 80,
        "x" * 5000,
        "Who?",
    ]
    questions, _ = truncate_questions(tokenizer, questions, max_question_tokens)
    contexts = [long_context_record(3_000)["context"]] * len(questions)
    answers = [{"text": ["1931"], "answer_start": [contexts[0].index("1931")]}] * len(questions)
    train_windows = make_train_windows(tokenizer, questions, contexts, answers, max_length, stride)
    eval_windows = make_eval_windows(tokenizer, questions, contexts, max_length, stride)
    assert set(train_windows["example_index"]) == set(range(len(questions)))
    assert max(map(len, eval_windows["input_ids"])) <= max_length
