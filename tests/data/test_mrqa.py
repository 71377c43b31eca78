"""MRQA jsonl end to end: ``data=mrqa`` trains and scores the tiny model through the CLI."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pytest

from qa_lightning.answers.metrics import squad_v1_scores
from qa_lightning.core.config import resource_path
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.readers import mrqa_jsonl, squad_json
from tests.conftest import TINY_OVERRIDES, run_cli

MRQA_OVERRIDES = [o for o in TINY_OVERRIDES if o != "data=demo"] + ["data=mrqa"]


def squad_to_mrqa(squad_file: str, out: Path) -> Path:
    """The shipped demo questions in the MRQA layout: a header, one context a line, detected
    answers with inclusive char spans (an answer text found at several starts: one answer,
    several spans)."""
    contexts: dict[str, list[dict]] = defaultdict(list)
    for record in squad_json(Path(squad_file)):
        spans: dict[str, list[list[int]]] = defaultdict(list)
        for answer in record["answers"]:
            start, text = answer["answer_start"], answer["text"]
            if [start, start + len(text) - 1] not in spans[text]:
                spans[text].append([start, start + len(text) - 1])
        contexts[record["context"]].append(
            {
                "qid": f"mrqa-{record['id']}",
                "question": record["question"],
                "answers": list(spans),
                "detected_answers": [
                    {"text": text, "char_spans": s, "token_spans": [[0, 0]] * len(s)}
                    for text, s in spans.items()
                ],
            }
        )
    lines = [{"header": {"dataset": "demo", "split": out.stem}}]
    lines += [{"context": context, "qas": qas} for context, qas in contexts.items()]
    with gzip.open(out, "wt", encoding="utf-8") as file:
        file.write("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")
    return out


@pytest.fixture(scope="module")
def mrqa_files(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mrqa")
    return (
        squad_to_mrqa(resource_path("demo/train.json"), tmp / "train.jsonl.gz"),
        squad_to_mrqa(resource_path("demo/validation.json"), tmp / "validation.jsonl.gz"),
    )


def test_mrqa_files_read_as_the_squad_files_they_came_from(mrqa_files) -> None:
    train, validation = mrqa_files
    for mrqa, squad in ((train, "demo/train.json"), (validation, "demo/validation.json")):
        original = {r["id"]: r for r in load_local_file(resource_path(squad)).to_list()}
        for record in load_local_file(mrqa, mrqa_jsonl).to_list():
            expected = original[record["id"].removeprefix("mrqa-")]
            assert record["context"] == expected["context"]
            assert record["question"] == expected["question"]
            pairs = set(zip(*record["answers"].values(), strict=True))
            assert pairs == set(zip(*expected["answers"].values(), strict=True))


def test_data_mrqa_trains_and_scores_through_the_cli(mrqa_files, tmp_path) -> None:
    train_file, validation_file = mrqa_files
    files = [f"data.train_file={train_file}", f"data.validation_file={validation_file}"]
    run_dir, cache = tmp_path / "run", f"paths.cache_dir={tmp_path / 'cache'}"
    result = run_cli(
        "qa_lightning.train", *MRQA_OVERRIDES, *files, cache, f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["train_questions"], metrics["validation_questions"]) == (70, 30)

    predictions = json.loads((run_dir / "predictions.json").read_text())
    examples = load_local_file(validation_file, mrqa_jsonl)
    assert set(predictions) == set(examples["id"]) and all(
        q.startswith("mrqa-") for q in predictions
    )
    references = dict(zip(examples["id"], (a["text"] for a in examples["answers"]), strict=True))
    rescored = squad_v1_scores(predictions, references)
    assert rescored["f1"] == pytest.approx(metrics["best"]["f1"], abs=1e-4)

    eval_dir = tmp_path / "eval"
    evaluated = run_cli(
        "qa_lightning.evaluate",
        *[o for o in MRQA_OVERRIDES if o.startswith(("data", "trainer"))],
        f"data.validation_file={validation_file}",
        f"ckpt_path={metrics['best_checkpoint']}",
        cache,
        f"hydra.run.dir={eval_dir}",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scores = json.loads((eval_dir / "metrics.json").read_text())
    assert (scores["f1"], scores["em"]) == (metrics["best"]["f1"], metrics["best"]["em"])
    assert scores["questions"] == 30


def test_an_mrqa_answer_not_at_its_span_stops_the_run_naming_the_question(tmp_path) -> None:
    context = "Ada Lovelace wrote the first program."
    bad = {
        "qid": "q-bad",
        "question": "Who wrote it?",
        "detected_answers": [{"text": "Ada Lovelace", "char_spans": [[1, 12]]}],  # 1 too late
    }
    path = tmp_path / "bad.jsonl"
    lines = [{"header": {"dataset": "hand"}}, {"context": context, "qas": [bad]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = run_cli(
        "qa_lightning.train",
        *MRQA_OVERRIDES,
        f"data.train_file={path}",
        f"data.validation_file={path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "1 bad record(s) of 1" in result.stderr
    assert "q-bad: answer 'Ada Lovelace' is not at answer_start 1" in result.stderr
    assert "Traceback" not in result.stderr
