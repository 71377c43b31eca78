"""SQuAD v2 end to end: unanswerable questions train on CLS, are scored with the v2 metrics, and
are answered "" by predict (PyTorch and ONNX) as validation decided."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import open_dict
from qa_pipeline import TRANSFORMERS4, pipeline_answers  # benchmarks/ (pytest's pythonpath)

from qa_lightning.answers.settings import SETTINGS_FILE, InferenceSettings
from qa_lightning.core.errors import ConfigError, DataError
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import make_train_windows
from qa_lightning.evaluate import evaluate
from qa_lightning.export import export
from qa_lightning.predict import predict
from qa_lightning.runs.checkpoint_reading import read_checkpoint
from qa_lightning.runs.config import validate_train_config
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.train import train
from tests.conftest import ROOT, TINY_OVERRIDES

V2_FILE = ROOT / "tests" / "fixtures" / "squad_v2_tiny.json"
V2_OVERRIDES = [
    *TINY_OVERRIDES,
    "data=local",
    f"data.train_file={V2_FILE}",
    f"data.validation_file={V2_FILE}",
    "data.version_2_with_negative=true",
    "data.batch_size=4",
]


def test_fixture_has_both_kinds_of_question() -> None:
    examples = load_local_file(V2_FILE)
    unanswerable = [e["id"] for e in examples if not e["answers"]["text"]]
    assert unanswerable == ["v2-004", "v2-005", "v2-009", "v2-013"]
    assert len(examples) == 13


def test_unanswerable_windows_are_labelled_cls(tokenizer) -> None:
    examples = load_local_file(V2_FILE)
    windows = make_train_windows(
        tokenizer, examples["question"][:], examples["context"][:], examples["answers"][:], 384, 128
    )
    for i, answers in enumerate(examples["answers"][:]):
        labels = (windows["start_positions"][i], windows["end_positions"][i])
        assert (labels == (0, 0)) == (not answers["text"])


def test_v1_config_rejects_unanswerable_questions(compose_train) -> None:
    cfg = compose_train([*V2_OVERRIDES, "data.version_2_with_negative=false"])
    with pytest.raises(DataError, match="v2-004: no answer"):
        train(cfg)


@pytest.mark.parametrize(("threshold", "empty"), [(-1e9, 13), (1e9, 0)])
def test_v2_training_logs_v2_metrics_and_threshold_decides(
    compose_train, tmp_path: Path, threshold: float, empty: int
) -> None:
    cfg = compose_train([*V2_OVERRIDES, f"postprocess.null_score_diff_threshold={threshold}"])
    metrics = train(cfg)
    best = metrics["best"]
    for key in ("HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh", "HasAns_total"):
        assert key in best
    assert (best["HasAns_total"], best["NoAns_total"]) == (9.0, 4.0)
    predictions = json.loads((Path(cfg.paths.output_dir) / "predictions.json").read_text())
    assert sum(text == "" for text in predictions.values()) == empty
    if empty == 13:  # every question answered "no answer": only the 4 unanswerable are right
        assert best["f1"] == pytest.approx(400 / 13)
        assert best["NoAns_f1"] == 100.0

    # served as validated: the export carries v2 and the threshold, predict applies them
    settings = InferenceSettings.from_dir(metrics["hf_model"])
    assert settings.version_2_with_negative
    assert settings.null_score_diff_threshold == threshold
    questions = tmp_path / "questions.jsonl"
    examples = load_local_file(V2_FILE)
    questions.write_text(
        "".join(
            json.dumps({"id": e["id"], "question": e["question"], "context": e["context"]}) + "\n"
            for e in examples
        )
    )
    onnx_dir = tmp_path / "onnx"
    export(
        compose_train(
            [f"ckpt_path={metrics['best_checkpoint']}", "format=onnx", f"out_dir={onnx_dir}"],
            config_name="export",
        )
    )
    for backend in (
        [f"model_dir={metrics['hf_model']}", "precision=32-true"],
        [f"onnx_path={onnx_dir / 'model.onnx'}"],
    ):
        output = tmp_path / "answers.jsonl"
        predict(
            compose_train(
                [*backend, f"input={questions}", f"output={output}", "top_k=3", "progress=false"],
                config_name="predict",
            )
        )
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        first = [row["answers"][0] for row in rows]
        assert sum(a["answer"] == "" for a in first) == empty, backend
        assert {row["id"] for row, a in zip(rows, first, strict=True) if a["answer"] == ""} == {
            qid for qid, text in predictions.items() if text == ""
        }
        for row in rows:
            texts = [a["answer"] for a in row["answers"]]
            assert len(texts) == 3 and sum(a["score"] for a in row["answers"]) <= 1 + 1e-6
            if empty:  # the null answer first, then the best spans
                assert texts[0] == "" and all(texts[1:])
                assert (row["answers"][0]["start"], row["answers"][0]["end"]) == (0, 0)
            else:
                assert all(texts)


def test_best_threshold_is_tuned_by_validation_and_exported(compose_train, tmp_path) -> None:
    cfg = compose_train(
        [*V2_OVERRIDES, "postprocess.null_score_diff_threshold=best", "trainer.max_epochs=2"]
    )
    metrics = train(cfg)
    best = metrics["best"]
    # validation applies its own best_f1_thresh; the best checkpoint's is exported
    assert best["null_score_diff_threshold"] == best["best_f1_thresh"]
    checkpoint = read_checkpoint(metrics["best_checkpoint"])
    assert checkpoint["hyper_parameters"]["null_score_diff_threshold"] == "best"
    assert checkpoint["qa_last"]["scores"]["best_f1_thresh"] == best["best_f1_thresh"]
    settings = json.loads((Path(metrics["hf_model"]) / SETTINGS_FILE).read_text())
    assert settings["null_score_diff_threshold"] == best["best_f1_thresh"]
    assert settings["version_2_with_negative"] is True

    predictions = json.loads((Path(cfg.paths.output_dir) / "predictions.json").read_text())
    for name, source in (
        ("checkpoint", f"ckpt_path={metrics['best_checkpoint']}"),  # tunes "best" again
        ("model_dir", f"model_dir={metrics['hf_model']}"),  # applies the exported number
    ):
        eval_cfg = compose_train(
            ["data=local", f"data.validation_file={V2_FILE}", "trainer=cpu", source], "eval"
        )
        with open_dict(eval_cfg):
            eval_cfg.paths.output_dir = str(tmp_path / "eval" / name)
        scores = evaluate(eval_cfg)
        assert (scores["f1"], scores["em"]) == (best["f1"], best["em"]), name
        assert scores["null_score_diff_threshold"] == best["best_f1_thresh"], name
        evaluated = json.loads((tmp_path / "eval" / name / "predictions.json").read_text())
        assert evaluated == predictions, name


@pytest.mark.parametrize("value", ["-1.5", "best"])
def test_threshold_is_a_number_or_best(compose_train, value: str) -> None:
    validate_train_config(
        compose_train([*V2_OVERRIDES, f"postprocess.null_score_diff_threshold={value}"])
    )


@pytest.mark.parametrize("value", ["tuned", "nan", "true"])
def test_other_thresholds_are_config_errors(compose_train, value: str) -> None:
    cfg = compose_train([*V2_OVERRIDES, f"postprocess.null_score_diff_threshold={value}"])
    with pytest.raises(ConfigError, match="postprocess.null_score_diff_threshold=.*or best"):
        validate_train_config(cfg)


def test_v2_answers_rank_the_null_answer_as_the_pipeline_does(compose_train) -> None:
    """At threshold 0, predict's ``top_k`` answers of a one-window question are those of the
    transformers 4 ``question-answering`` pipeline with ``handle_impossible_answer`` (in one
    window its null-versus-span comparison of probabilities is one of logits). Over several
    windows they differ by design: the pipeline takes the null answer's smallest per-window
    probability, predict (as ``utils_qa.py``) its smallest logit sum."""
    if not TRANSFORMERS4.is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: `make setup` installs transformers 4 there")
    metrics = train(compose_train(V2_OVERRIDES))
    hf_model = Path(metrics["hf_model"])
    settings = InferenceSettings.from_dir(hf_model)
    assert settings.version_2_with_negative and settings.null_score_diff_threshold == 0.0
    examples = load_local_file(V2_FILE)
    questions, contexts = examples["question"][:], examples["context"][:]
    answerer = QuestionAnswerer.from_model_dir(hf_model, device="cpu", precision="32-true")
    ours = [[a.text for a in found] for found in answerer.answer(questions, contexts, top_k=3)]
    rows = [{"question": q, "context": c} for q, c in zip(questions, contexts, strict=True)]
    runs = pipeline_answers(hf_model, rows, {**asdict(settings), "top_k": 3})
    theirs = next(run for run in runs if not run["align_to_words"])["top_k_answers"]
    one_window = [
        len(answerer.tokenizer(q, c)["input_ids"]) <= settings.max_length
        for q, c in zip(questions, contexts, strict=True)
    ]
    compared = [(a, b) for a, b, one in zip(ours, theirs, one_window, strict=True) if one]
    assert len(compared) >= 10
    assert any("" in a for a, _ in compared)  # the null answer is among the candidates
    assert [a for a, _ in compared] == [b for _, b in compared]
