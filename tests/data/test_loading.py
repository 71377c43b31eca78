"""Local SQuAD-format files (json, jsonl, parquet) and record checks."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa_lightning.core.errors import ConfigError, DataError
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.records import check_records, record_problems

RIVER = "The Thames flows through London."
CAFE = "Le café ferme à 18 h."

EXPECTED = [
    {
        "id": "r1",
        "title": "Rivers",
        "context": RIVER,
        "question": "Which river?",
        "answers": {"text": ["The Thames", "Thames"], "answer_start": [0, 4]},
    },
    {
        "id": "r2",
        "title": "Rivers",
        "context": RIVER,
        "question": "Through which city?",
        "answers": {"text": ["London"], "answer_start": [25]},
    },
    {
        "id": "c1",
        "title": "Café",
        "context": CAFE,
        "question": "Quand ferme le café ?",
        "answers": {"text": ["18 h"], "answer_start": [16]},
    },
]

SQUAD_LAYOUT = {
    "version": "1.1",
    "data": [
        {
            "title": "Rivers",
            "paragraphs": [
                {
                    "context": RIVER,
                    "qas": [
                        {
                            "id": "r1",
                            "question": "Which river?",
                            "answers": [
                                {"text": "The Thames", "answer_start": 0},
                                {"text": "Thames", "answer_start": 4},
                            ],
                        },
                        {
                            "id": "r2",
                            "question": "Through which city?",
                            "answers": [{"text": "London", "answer_start": 25}],
                        },
                    ],
                }
            ],
        },
        {
            "title": "Café",
            "paragraphs": [
                {
                    "context": CAFE,
                    "qas": [
                        {
                            "id": "c1",
                            "question": "Quand ferme le café ?",
                            "answers": [{"text": "18 h", "answer_start": 16}],
                        }
                    ],
                }
            ],
        },
    ],
}


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", "utf-8")
    return path


def answer_list(answers):
    pairs = zip(answers["text"], answers["answer_start"], strict=True)
    return [{"text": text, "answer_start": start} for text, start in pairs]


def test_expected_answers_are_where_they_say():
    for record in EXPECTED:
        for text, start in zip(*record["answers"].values(), strict=True):
            assert record["context"][start : start + len(text)] == text


def test_squad_json_layout(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(SQUAD_LAYOUT, ensure_ascii=False), encoding="utf-8")
    assert load_local_file(path).to_list() == EXPECTED


def test_json_list_jsonl_and_parquet_load_the_same(tmp_path):
    json_list = tmp_path / "records.json"
    json_list.write_text(json.dumps(EXPECTED), encoding="utf-8")
    # jsonl with answers as a list of {"text", "answer_start"}, as in the SQuAD layout
    rows = [{**r, "answers": answer_list(r["answers"])} for r in EXPECTED]
    jsonl = write_jsonl(tmp_path / "records.jsonl", rows)
    parquet = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist(EXPECTED), parquet)
    for path in (json_list, jsonl, parquet):
        assert load_local_file(path).to_list() == EXPECTED, path.name


def test_jsonl_blank_lines_missing_title_and_unanswerable(tmp_path):
    path = tmp_path / "v2.jsonl"
    path.write_text(
        '{"id": 1, "context": "abc", "question": "q?", "answers": {"text": [], '
        '"answer_start": []}}\n\n',
        encoding="utf-8",
    )
    (record,) = load_local_file(path).to_list()
    assert record == {
        "id": "1",
        "title": "",
        "context": "abc",
        "question": "q?",
        "answers": {"text": [], "answer_start": []},
    }


def test_squad_layout_is_impossible_has_no_answers(tmp_path):
    layout = json.loads(json.dumps(SQUAD_LAYOUT))
    qa = layout["data"][0]["paragraphs"][0]["qas"][1]
    qa.update(is_impossible=True, plausible_answers=qa.pop("answers"), answers=[])
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    assert load_local_file(path)[1]["answers"] == {"text": [], "answer_start": []}


# -- file errors --------------------------------------------------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": ]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"not valid JSON: .* at line 3, column 18"):
        load_local_file(path)


def test_invalid_jsonl_reports_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXPECTED[0]) + '\n{"id": "x", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON \(.*, column 13\)"):
        load_local_file(path)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"id": "c", "context": "café"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 27"):
        load_local_file(path)


def test_missing_field_is_named(tmp_path):
    record = {k: v for k, v in EXPECTED[1].items() if k != "question"}
    path = write_jsonl(tmp_path / "missing.jsonl", [EXPECTED[0], record])
    message = r"record 'r2' \(position 1\) lacks field\(s\) \['question'\]"
    with pytest.raises(DataError, match=message):
        load_local_file(path)


def test_squad_layout_missing_field_is_named(tmp_path):
    layout = json.loads(json.dumps(SQUAD_LAYOUT))
    del layout["data"][1]["paragraphs"][0]["qas"][0]["question"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    with pytest.raises(DataError, match=r"article 1 \('Café'\) lacks field 'question'"):
        load_local_file(path)


@pytest.mark.parametrize("name", ["absent.json", "data.csv"])
def test_missing_file_or_unknown_extension(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("id,context\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="does not exist|unsupported extension '.csv'"):
        load_local_file(path)


# -- record checks ------------------------------------------------------------------------------


def examples(*changes):
    """EXPECTED with ``(position, field, value)`` changes applied."""
    records = json.loads(json.dumps(EXPECTED))
    for position, field, value in changes:
        records[position][field] = value
    return datasets.Dataset.from_list(records)


def test_good_records_pass():
    kept, problems = check_records(examples(), "train.json")
    assert problems == {} and kept.to_list() == EXPECTED


def test_answer_not_at_answer_start_raises_naming_the_id():
    bad = examples((1, "answers", {"text": ["London"], "answer_start": [24]}))
    with pytest.raises(DataError, match=r"1 bad record\(s\) of 3 in train.json: r2: answer"):
        check_records(bad, "train.json")


def test_skip_drops_bad_records_and_reports_them():
    bad = examples((1, "answers", {"text": ["London"], "answer_start": [24]}))
    kept, problems = check_records(bad, "train.json", on_bad_record="skip")
    assert kept["id"] == ["r1", "c1"]
    assert list(problems) == ["r2"]
    assert "not at answer_start 24" in problems["r2"] and "' Londo'" in problems["r2"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ((2, "id", "r1"), "id appears 2 times"),
        ((1, "context", "   "), "empty context"),
        ((1, "question", ""), "empty question"),
        ((1, "answers", {"text": ["London."], "answer_start": [26]}), "lies outside the context"),
        ((1, "answers", {"text": ["London"], "answer_start": [-1]}), "lies outside the context"),
        ((1, "answers", {"text": [" "], "answer_start": [3]}), "empty answer text"),
        ((1, "answers", {"text": [], "answer_start": []}), "no answer"),
    ],
)
def test_record_problems(change, problem):
    problems = record_problems(examples(change))
    bad_id = "r1" if change[1] == "id" else "r2"
    assert list(problems) == [bad_id]
    assert problem in problems[bad_id]


def test_unanswerable_allowed_for_v2():
    v2 = examples((1, "answers", {"text": [], "answer_start": []}))
    assert record_problems(v2, allow_unanswerable=True) == {}
