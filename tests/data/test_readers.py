"""Readers chosen by config: MRQA jsonl (inclusive char spans, several spans per answer) and the
default reader by extension."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from qa_lightning.core.errors import ConfigError, DataError
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.readers import by_extension, mrqa_answers, mrqa_jsonl, squad_jsonl
from qa_lightning.data.records import record_problems

# index: Ada 0-2, Lovelace 4-11, program 29-35, "." 36, Lovelace 38-45, mathematician 53-65
CONTEXT = "Ada Lovelace wrote the first program. Lovelace was a mathematician."
HEADER = {"header": {"dataset": "Hand", "split": "dev"}}


def qa(qid: str, question: str, *detected: tuple[str, list[list[int]]]) -> dict:
    return {
        "qid": qid,
        "question": question,
        "answers": [text for text, _ in detected],
        "detected_answers": [
            {"text": text, "char_spans": spans, "token_spans": [[0, 0]] * len(spans)}
            for text, spans in detected
        ],
    }


def write_mrqa(path: Path, *contexts: dict) -> Path:
    lines = [json.dumps(HEADER), *(json.dumps(c) for c in contexts)]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path


def test_inclusive_end_is_the_last_character_of_the_answer() -> None:
    # [0, 11] holds 12 characters: "Ada Lovelace"; an exclusive end would have been 12
    assert mrqa_answers(CONTEXT, [{"text": "Ada Lovelace", "char_spans": [[0, 11]]}]) == {
        "text": ["Ada Lovelace"],
        "answer_start": [0],
    }
    assert mrqa_answers(CONTEXT, [{"text": "program", "char_spans": [[29, 35]]}]) == {
        "text": ["program"],  # not "program." (36 is the full stop)
        "answer_start": [29],
    }


def test_an_answer_found_twice_gives_an_answer_per_span() -> None:
    detected = [
        {"text": "lovelace", "char_spans": [[4, 11], [38, 45]]},  # lower-cased, as TriviaQA's
        {"text": "Ada Lovelace", "char_spans": [[0, 11]]},
        {"text": "Lovelace", "char_spans": [[38, 45]]},  # the same span again: dropped
    ]
    assert mrqa_answers(CONTEXT, detected) == {
        "text": ["Lovelace", "Lovelace", "Ada Lovelace"],
        "answer_start": [4, 38, 0],
    }


def test_a_wrong_span_keeps_the_detected_text_at_its_start() -> None:
    detected = [
        {"text": "Ada Lovelace", "char_spans": [[0, 12]]},  # end one too far: "Ada Lovelace "
        {"text": "mathematician", "char_spans": [[52, 64]]},  # start one too early
        {"text": "program", "char_spans": [[60, 90]]},  # beyond the context
    ]
    assert mrqa_answers(CONTEXT, detected) == {
        "text": ["Ada Lovelace", "mathematician", "program"],
        "answer_start": [0, 52, 60],
    }


def test_mrqa_file_reads_to_squad_examples_and_bad_spans_are_listed_by_id(tmp_path) -> None:
    path = write_mrqa(
        tmp_path / "hand.jsonl.gz",
        {
            "id": "c0",
            "context": CONTEXT,
            "context_tokens": [["Ada", 0]],
            "qas": [
                qa("q-who", "Who wrote the first program?", ("Ada Lovelace", [[0, 11]])),
                qa("q-twice", "Whose name appears twice?", ("lovelace", [[4, 11], [38, 45]])),
                qa("q-bad", "What was she?", ("mathematician", [[52, 64]])),
            ],
        },
        {"context": "Paris is in France.", "qas": [qa("q-fr", "Where?", ("France", [[12, 17]]))]},
    )
    examples = load_local_file(path, mrqa_jsonl)
    assert examples.to_list() == [
        {
            "id": "q-who",
            "title": "",
            "context": CONTEXT,
            "question": "Who wrote the first program?",
            "answers": {"text": ["Ada Lovelace"], "answer_start": [0]},
        },
        {
            "id": "q-twice",
            "title": "",
            "context": CONTEXT,
            "question": "Whose name appears twice?",
            "answers": {"text": ["Lovelace", "Lovelace"], "answer_start": [4, 38]},
        },
        {
            "id": "q-bad",
            "title": "",
            "context": CONTEXT,
            "question": "What was she?",
            "answers": {"text": ["mathematician"], "answer_start": [52]},
        },
        {
            "id": "q-fr",
            "title": "",
            "context": "Paris is in France.",
            "question": "Where?",
            "answers": {"text": ["France"], "answer_start": [12]},
        },
    ]
    assert record_problems(examples) == {
        "q-bad": "answer 'mathematician' is not at answer_start 52 (context has ' mathematicia' "
        "there)"
    }


def test_mrqa_line_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HEADER) + '\n{"context": "abc", "qas": [{"question": "q"}]}\n')
    with pytest.raises(DataError, match=r"line 2: not an MRQA context \(KeyError: 'qid'\)"):
        mrqa_jsonl(path)
    path.write_text(json.dumps(HEADER) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"line 3 is not valid JSON .* An MRQA file has a header"):
        mrqa_jsonl(path)


def test_default_reader_dispatches_on_extension(tmp_path) -> None:
    record = {"id": "a", "context": "xyz", "question": "q?", "answers": []}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert by_extension(path) == squad_jsonl(path) == [record]
    with pytest.raises(ConfigError, match=r"unsupported extension '\.gz'.*data/reader=mrqa"):
        by_extension(write_mrqa(tmp_path / "m.jsonl.gz"))
