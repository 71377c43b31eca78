"""Answering questions: the predict CLI, jsonl files, long contexts, ranking, the ONNX backend.

A random tiny model (no training) is enough here: the checks are about spans, ranking and files,
not about answer quality (see test_export.py for a trained model).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qa_lightning.answers.postprocess import best_example_spans, best_window_spans
from qa_lightning.answers.ranking import rank_answers
from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.cli import report_errors
from qa_lightning.core import config
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.windowing import make_eval_windows
from qa_lightning.model.logits import TorchLogits, resolve_precision
from qa_lightning.predict import predict
from qa_lightning.serving.answerer import InputError, QuestionAnswerer
from qa_lightning.serving.jsonl import read_question_lines
from tests.conftest import ROOT

SETTINGS = InferenceSettings(max_length=128, stride=32)
QUESTION = "Who wrote the report?"
CONTEXT = "The report was written by the committee in 1998, after a long inquiry into the bridge."


@pytest.fixture(scope="module")
def answerer(model_dir: Path) -> QuestionAnswerer:
    return QuestionAnswerer.from_model_dir(
        model_dir, device="cpu", batch_size=8, precision="32-true"
    )


def run_predict(*overrides: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "qa_lightning.predict", *overrides],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def printed_answers(stdout: str) -> list[dict]:
    """The ``N. {json}`` lines that predict prints."""
    return [
        json.loads(line.split(". ", 1)[1])
        for line in stdout.splitlines()
        if line[:1].isdigit() and ". {" in line
    ]


def test_cli_answers_a_question_with_its_character_span(model_dir: Path, tmp_path: Path) -> None:
    result = run_predict(
        f"model_dir={model_dir}",
        f"question='{QUESTION}'",
        f"context='{CONTEXT}'",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = printed_answers(result.stdout)
    assert len(answers) == 1
    answer = answers[0]
    assert answer["answer"] and CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    assert 0 < answer["score"] <= 1


def test_empty_question_is_a_one_paragraph_error_with_exit_code_2(
    compose_train, model_dir: Path, capsys
) -> None:
    cfg = compose_train([f"model_dir={model_dir}", "question='   '"], config_name="predict")
    cfg.context = CONTEXT
    with pytest.raises(SystemExit) as exit_info:
        report_errors(lambda: predict(cfg))  # as predict's main does
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: the question is only whitespace; give a non-empty question.\n"
    )


def test_top_k_answers_are_sorted_probabilities(compose_train, model_dir: Path, capsys) -> None:
    cfg = compose_train(
        [f"model_dir={model_dir}", "top_k=3", "device=cpu", f"question={QUESTION}"],
        config_name="predict",
    )
    cfg.context = CONTEXT
    answers = predict(cfg)
    assert len(answers) == 3
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1 + 1e-9
    assert len({(a["start"], a["end"]) for a in answers}) == 3
    for answer in answers:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    assert printed_answers(capsys.readouterr().out) == answers


def test_jsonl_file_reports_bad_lines_and_answers_the_rest(
    compose_train, model_dir: Path, tmp_path: Path
) -> None:
    lines = [
        json.dumps({"id": "a", "question": QUESTION, "context": CONTEXT}),
        '{"question": "When?", "context": ',  # line 2: not JSON
        "",  # blank lines are ignored
        json.dumps({"question": "When was it written?", "context": CONTEXT}),
        json.dumps({"id": "e", "question": "Why?", "context": "  "}),  # line 5: empty context
        json.dumps(["not", "an", "object"]),  # line 6
        json.dumps({"id": 7, "question": "What was inquired into?", "context": CONTEXT}),
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "answers.jsonl"
    cfg = compose_train(
        [f"model_dir={model_dir}", f"input={questions}", f"output={output}", "top_k=2"],
        config_name="predict",
    )
    summary = predict(cfg)
    assert summary["answered"] == 3
    assert [b["line"] for b in summary["bad_lines"]] == [2, 5, 6]
    assert "not valid JSON" in summary["bad_lines"][0]["problem"]
    assert "context is only whitespace" in summary["bad_lines"][1]["problem"]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["line"] for row in rows] == [1, 2, 4, 5, 6, 7]
    answered = [row for row in rows if "answers" in row]
    assert [row.get("id") for row in answered] == ["a", None, "7"]
    for row in answered:
        assert len(row["answers"]) == 2
        for answer in row["answers"]:
            assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    assert {row["line"] for row in rows if "error" in row} == {2, 5, 6}


#: jsonl as a user pipes it: UTF-8 text unescaped, a line that is not JSON, a line without id.
STDIN_LINES = [
    json.dumps(
        {"id": "z", "question": "When did Zoë move to Kraków, and why?", "context": CONTEXT},
        ensure_ascii=False,
    ),
    '{"question": "When?", "context": ',  # line 2: not JSON
    json.dumps({"question": QUESTION, "context": CONTEXT}),
]


def test_cli_reads_jsonl_from_stdin_and_writes_answers_to_stdout(
    model_dir: Path, tmp_path: Path
) -> None:
    """``input=-`` without ``output``: standard output holds only the answer rows (logs and the
    summary go to standard error), a bad line is reported by number, text needs no quoting."""
    result = run_predict(
        f"model_dir={model_dir}",
        "input=-",
        "top_k=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        stdin="\n".join(STDIN_LINES) + "\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but jsonl
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert rows[0]["id"] == "z" and rows[0]["question"] == "When did Zoë move to Kraków, and why?"
    assert rows[1] == {"line": 2, "error": "not valid JSON (Expecting value, column 34)"}
    for row in (rows[0], rows[2]):
        assert len(row["answers"]) == 2
        for answer in row["answers"]:
            assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    assert (
        "answered 2 question(s) into standard output; skipped 1 bad line(s): line 2 "
        "(not valid JSON (Expecting value, column 34))" in result.stderr
    )
    assert "standard input line 2: not valid JSON" in result.stderr  # the logged warning
    assert not list((tmp_path / "run").glob("answers.jsonl"))


def test_stdin_to_an_output_file_and_a_file_to_stdout(
    compose_train, model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``input=-`` with ``output=FILE`` writes the file; ``output=-`` writes any input's answers
    to standard output; both hold the rows an input file gives."""
    text = "\n".join(STDIN_LINES) + "\n"
    questions = tmp_path / "questions.jsonl"
    questions.write_text(text, encoding="utf-8")
    expected = tmp_path / "expected.jsonl"
    base = [f"model_dir={model_dir}", "device=cpu", "precision=32-true", "progress=false"]
    predict(compose_train([*base, f"input={questions}", f"output={expected}"], "predict"))
    capsys.readouterr()

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    output = tmp_path / "from_stdin.jsonl"
    summary = predict(compose_train([*base, "input=-", f"output={output}"], "predict"))
    assert summary["answered"] == 2 and summary["output"] == str(output)
    assert output.read_text(encoding="utf-8") == expected.read_text(encoding="utf-8")
    assert capsys.readouterr().out.startswith("answered 2 question(s) into")

    summary = predict(compose_train([*base, f"input={questions}", "output=-"], "predict"))
    captured = capsys.readouterr()
    assert captured.out == expected.read_text(encoding="utf-8")
    assert "answered 2 question(s) into standard output" in captured.err


def test_file_without_answerable_lines_is_an_error(tmp_path: Path, answerer) -> None:
    from qa_lightning.serving.jsonl import answer_file

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": ""}\nnot json\n')
    with pytest.raises(InputError, match="no line that can be answered"):
        answer_file(answerer, questions, tmp_path / "answers.jsonl")
    assert read_question_lines(questions)[1] == [
        (1, "the question is empty"),
        (2, "not valid JSON (Expecting value, column 1)"),
    ]


def test_one_json_document_is_named_not_reported_line_by_line(tmp_path: Path, caplog) -> None:
    """A SQuAD json file (or any JSON over several lines) given as ``input=``: one error that
    names what it is and, for SQuAD, ``evaluate``; no warning for each of its lines."""
    from qa_lightning.serving.jsonl import load_question_file

    record = {"question": "Who?", "context": "Bob went home."}
    squad = tmp_path / "dev.json"
    squad.write_text(
        json.dumps({"data": [{"paragraphs": [{"context": "Bob.", "qas": []}]}]}, indent=1)
    )
    pretty = tmp_path / "questions.json"
    pretty.write_text(json.dumps([record, record], indent=2))
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as error:
        load_question_file(squad)
    assert str(error.value).startswith(f"input='{squad}' is a SQuAD json file, not jsonl.")
    assert f"evaluate <the same model key> data=local data.validation_file={squad}." in str(
        error.value
    )
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as error:
        load_question_file(pretty)
    assert str(error.value).startswith(f"input='{pretty}' is one JSON list over 10 lines, not")
    assert not caplog.records
    pretty.write_text("\n".join(json.dumps(r) for r in [record, record]))  # as jsonl: answered
    assert len(load_question_file(pretty)[0]) == 2


def test_long_context_is_windowed_like_evaluation(answerer, tokenizer, validation) -> None:
    """A context of several windows: the best answer is evaluation's best span over windows."""
    context = " ".join(validation["context"][:4])
    question = validation["question"][3]
    windows = make_eval_windows(
        tokenizer, [question], [context], SETTINGS.max_length, SETTINGS.stride
    )
    assert len(windows["input_ids"]) >= 3
    answers = answerer.answer([question], [context], top_k=5)[0]
    assert len(answers) == 5
    for answer in answers:
        assert context[answer.start : answer.end] == answer.text
    batch = answerer.collator(
        [
            {k: windows[k][i] for k in windows if k != "length"}
            for i in range(len(windows["input_ids"]))
        ]
    )
    start_logits, end_logits = answerer.logits_fn(batch)
    spans = best_window_spans(start_logits, end_logits, batch["offset_mapping"])
    score, start, end = best_example_spans(
        np.zeros(len(spans.scores), dtype=np.int64),
        spans.scores[:, 0].numpy(),
        spans.start_chars[:, 0].numpy(),
        spans.end_chars[:, 0].numpy(),
        1,
    )
    assert (answers[0].start, answers[0].end) == (start[0], end[0])


def test_answers_do_not_depend_on_batching(model_dir: Path, validation) -> None:
    questions, contexts = validation["question"][:10], validation["context"][:10]
    one = QuestionAnswerer.from_model_dir(
        model_dir, device="cpu", batch_size=1, precision="32-true"
    )
    many = QuestionAnswerer.from_model_dir(
        model_dir, device="cpu", batch_size=7, precision="32-true"
    )
    for a, b in zip(
        one.answer(questions, contexts, 3), many.answer(questions, contexts, 3), strict=True
    ):
        assert [(x.start, x.end) for x in a] == [(x.start, x.end) for x in b]
        assert [x.score for x in a] == pytest.approx([x.score for x in b], abs=1e-5)


def test_windows_of_different_candidate_counts_are_ranked_per_question(model_dir: Path) -> None:
    """n_best=100: a 1-word context's window (8 tokens) has 64 candidate spans, a longer one 100;
    batches sorted by length hold one or the other, and each question gets its own spans."""
    questions, contexts = ["Who?", QUESTION, "Who?"], ["Me.", CONTEXT, "Them."]
    answers = [
        QuestionAnswerer.from_model_dir(model_dir, "cpu", batch_size, "32-true", n_best=100).answer(
            questions, contexts, top_k=100
        )
        for batch_size in (1, 3)
    ]
    for one, together in zip(*answers, strict=True):
        assert [(a.start, a.end) for a in one] == [(a.start, a.end) for a in together]
    for context, ranked in zip(contexts, answers[0], strict=True):
        assert ranked and all(context[a.start : a.end] == a.text for a in ranked)
    assert {a.text for a in answers[0][0]} <= {"Me", "Me.", "."}
    assert len(answers[0][1]) > len(answers[0][0])


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_is_trainings_default_on_the_cpu(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(config, "cpu_supports_bf16", lambda: native_bf16)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("32-true", "cpu") == "32-true"


def test_bf16_logits_are_close_to_fp32_but_computed_in_bf16(
    answerer, model_dir, tokenizer, validation
):
    from qa_lightning.model import load_qa_model

    questions, contexts = validation["question"][:8], validation["context"][:8]
    windows = make_eval_windows(tokenizer, questions, contexts, 128, 32)
    keys = [k for k in windows if k != "length"]
    batch = answerer.collator([{k: windows[k][i] for k in keys} for i in range(8)])
    fp32 = answerer.logits_fn(batch)  # the fixture runs in 32-true (packed for oneDNN)
    model = load_qa_model(str(model_dir), trained_head=True)
    bf16 = TorchLogits(model, "cpu", "bf16-mixed")(batch)
    for a, b in zip(fp32, bf16, strict=True):
        assert b.dtype == torch.float32  # returned as fp32 for post-processing
        difference = (a - b).abs().max().item()
        assert 0 < difference < 0.05 * a.abs().max().item()  # bf16 rounding: not 0, and small


def test_rank_answers_merges_spans_of_overlapping_windows() -> None:
    context = "abcdefghij"
    # two windows' candidates; span (2, 5) is found by both
    scores = np.array([3.0, 1.0, -np.inf, 2.5, 2.0, 0.5])
    starts = np.array([2, 0, 0, 2, 6, 1])
    ends = np.array([5, 4, 0, 5, 9, 3])
    answers = rank_answers(context, scores, starts, ends, n_best=20, top_k=10)
    assert [(a.start, a.end) for a in answers] == [(2, 5), (6, 9), (0, 4), (1, 3)]
    assert [a.text for a in answers] == ["cde", "ghi", "abcd", "bc"]
    expected = np.exp([3.0, 2.0, 1.0, 0.5]) / np.exp([3.0, 2.0, 1.0, 0.5]).sum()
    assert [a.score for a in answers] == pytest.approx(expected)
    # the softmax is over the n_best best spans only
    top2 = rank_answers(context, scores, starts, ends, n_best=2, top_k=10)
    assert [a.score for a in top2] == pytest.approx(np.exp([0.0, -1.0]) / np.exp([0, -1.0]).sum())
    assert rank_answers(context, np.array([-np.inf]), np.array([0]), np.array([0])) == []


def test_empty_inputs_are_clear_errors(answerer) -> None:
    with pytest.raises(InputError, match="the context is empty"):
        answerer.answer([QUESTION], [""])
    with pytest.raises(InputError, match=r"the question is only whitespace \(pair 1\)"):
        answerer.answer([QUESTION, "\t "], [CONTEXT, CONTEXT])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "give either question=... context=..."),
        (["question=Who?", "context=Me."], "give exactly one of model_dir=PATH"),
        (["question=Who?", "context=Me.", "input=x.jsonl"], "give either"),
        (["input=/nonexistent.jsonl", "model_dir=MODEL"], "input='/nonexistent.jsonl' does not"),
        (["question=Who?", "model_dir=MODEL"], None),
        (
            ["question=Who?", "context=Me.", "onnx_path=/nonexistent.onnx"],
            "onnx_path='/nonexistent.onnx' does not exist",
        ),
        (
            ["question=Who?", "context=Me.", "model_dir=/nonexistent"],
            "model_dir='/nonexistent' is not a",
        ),
        (
            ["question=Who?", "context=Me.", "model_dir=RUN"],
            "model_dir='RUN' is a run dir, not a Hugging Face model directory; its model: "
            "model_dir=MODEL.",
        ),
        (["question=Who?", "context=Me.", "top_k=0"], "top_k=0"),
        (["question=Who?", "context=Me.", "model_dir=MODEL", "precision=fp8"], "precision='fp8'"),
        (
            ["question=Who?", "context=Me.", "onnx_path=x.onnx", "precision=bf16-mixed"],
            "precision='bf16-mixed' with onnx_path",
        ),
        (
            ["question=Who?", "context=Me.", "stride=100", "model_dir=MODEL"],
            "invalid setting stride=100",
        ),
    ],
)
def test_config_errors_name_the_key(compose_train, model_dir, overrides, message) -> None:
    def fill(text: str) -> str:
        return text.replace("RUN", str(model_dir.parent)).replace("MODEL", str(model_dir))

    overrides = [fill(o) for o in overrides]
    cfg = compose_train(overrides, config_name="predict")
    if message is None:  # a question without its context: an input error, also before loading
        with pytest.raises(InputError, match="the context is missing; give a non-empty context"):
            predict(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(fill(message))):
        predict(cfg)


def test_onnx_backend_gives_the_torch_answers(model_dir: Path, tmp_path: Path, validation) -> None:
    pytest.importorskip("onnxruntime")
    from qa_lightning.runs.checkpoint_reading import load_model_dir
    from qa_lightning.serving.exports import export_onnx, onnx_max_abs_diff

    exported = load_model_dir(model_dir)
    onnx_path = export_onnx(exported, tmp_path / "onnx_model")
    assert onnx_max_abs_diff(exported, onnx_path) < 1e-4
    questions, contexts = validation["question"], validation["context"]
    torch_answers = QuestionAnswerer.from_model_dir(
        model_dir, device="cpu", precision="32-true"
    ).answer(questions, contexts, 3)
    onnx = QuestionAnswerer.from_onnx(onnx_path)
    # a session of the same file with one thread that does not spin (the server's shared cores)
    one = onnx.logits_fn.with_threads(1, spin=False)
    options = one.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for answerer in (onnx, onnx.replaced(one)):
        onnx_answers = answerer.answer(questions, contexts, 3)
        for t, o in zip(torch_answers, onnx_answers, strict=True):
            assert [(a.text, a.start, a.end) for a in t] == [(a.text, a.start, a.end) for a in o]
            assert [a.score for a in t] == pytest.approx([a.score for a in o], abs=1e-5)


def test_a_base_encoder_without_a_qa_head_is_refused_not_answered_at_random(tmp_path) -> None:
    """The demo model's package is a sentence encoder: its weights lack qa_outputs.*, which
    transformers would fill with random values."""
    from qa_lightning.core.errors import ConfigError
    from qa_lightning.serving.answerer import QuestionAnswerer
    from tests.conftest import minilm_path

    with pytest.raises(ConfigError) as error:
        QuestionAnswerer.from_model_dir(minilm_path(), "cpu")
    message = str(error.value)
    assert (
        "is not a question-answering model: it lacks qa_outputs.bias, qa_outputs.weight" in message
    )
    assert "python -m qa_lightning.train model.name_or_path=" in message
