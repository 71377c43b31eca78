"""Bad input to predict, evaluate, export and report: one-paragraph errors naming the key, file
or line, exit status 2; a jsonl file's bad lines are reported by number and the rest answered."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from qa_lightning import report
from qa_lightning.evaluate import evaluate
from qa_lightning.export import export
from qa_lightning.model import QAModule
from qa_lightning.model.logits import TorchLogits
from qa_lightning.predict import predict
from qa_lightning.runs import sweep_report
from qa_lightning.serving.answerer import QuestionAnswerer
from tests.conftest import EVAL_OVERRIDES
from tests.data.test_errors_data import LONG_QUESTION, UNICODE, long_context_record
from tests.test_errors import _short_errors, cli_error, in_process_error, run_cli  # noqa: F401

CONTEXT = "The report was written by the committee in 1998, after a long inquiry into the bridge."


def assert_exact_offsets(context: str, answers: list[dict]) -> None:
    for answer in answers:
        assert context[answer["start"] : answer["end"]] == answer["answer"]


# -- predict -----------------------------------------------------------------------------------


def test_cli_predict_answers_the_good_lines_and_reports_the_bad_by_number(model_dir, tmp_path):
    long = long_context_record()
    good = [
        {"id": r["id"], "question": r["question"], "context": r["context"]} for r in UNICODE[:3]
    ]
    lines = [
        json.dumps(good[0], ensure_ascii=False),
        '{"question": "When?", "context": ',  # 2: not JSON
        json.dumps({"id": "blank", "question": " \t ", "context": CONTEXT}),  # 3
        json.dumps({"id": "long", "question": LONG_QUESTION, "context": long["context"]}),
        json.dumps(good[1], ensure_ascii=False),
        json.dumps(["not", "an", "object"]),  # 6
        json.dumps({"id": "no-context", "question": "Who?"}),  # 7
        json.dumps(good[2], ensure_ascii=False),
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    result = run_cli(
        "qa_lightning.predict",
        f"model_dir={model_dir}",
        f"input={questions}",
        f"output={output}",
        "top_k=3",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        f"answered 4 question(s) into {output}; skipped 4 bad line(s): line 2 (not valid JSON "
        "(Expecting value, column 34)), line 3 (the question is only whitespace), line 6 (a JSON "
        "list, not an object), line 7 (the context is missing)"
    ) in result.stdout
    truncated = "question(s) longer than max_question_tokens=64 tokens were truncated"
    assert truncated in result.stdout + result.stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 9))
    contexts = {r["id"]: r["context"] for r in good} | {"long": long["context"]}
    answered = [row for row in rows if "answers" in row]
    assert [row["id"] for row in answered] == ["combining", "long", "precomposed", "emoji"]
    for row in answered:
        assert len(row["answers"]) == 3
        assert_exact_offsets(contexts[row["id"]], row["answers"])
    assert {row["line"] for row in rows if "error" in row} == {2, 3, 6, 7}
    assert not Path(f"{output}.part").exists()


def test_cli_predict_whitespace_question_is_a_clear_error(model_dir, tmp_path) -> None:
    cli_error(
        run_cli(
            "qa_lightning.predict",
            f"model_dir={model_dir}",
            "question='  '",
            f"context='{CONTEXT}'",
            f"hydra.run.dir={tmp_path / 'run'}",
        ),
        "the question is only whitespace; give a non-empty question.",
    )


def compose_predict(compose_train, model_dir: Path, *overrides: str):
    return compose_train(
        [f"model_dir={model_dir}", "device=cpu", "progress=false", *overrides],
        config_name="predict",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["question=Who?", "context=''"], ["the context is empty; give a non-empty context"]),
        (["question=Who?"], ["the context is missing"]),
        (["question=Who?", "context=Me.", "top_k=two"], ["top_k='two'", "must be an integer"]),
        (["question=Who?", "context=Me.", "batch_size=0"], ["batch_size=0", "integer > 0"]),
        (["question=Who?", "context=Me.", "max_length=long"], ["max_length='long'", "integer"]),
        (["question=Who?", "context=Me.", "stride=60"], ["stride=60", "[0, 60)"]),
        (["question=Who?", "context=Me.", "device=tpu9"], ["device='tpu9' is not a torch"]),
        (["input=MODEL"], ["input='MODEL' does not exist"]),
        (["input=BAD_UTF8"], ["input='BAD_UTF8' is not valid UTF-8"]),
        (["input=EMPTY"], ["input='EMPTY' has no line that can be answered (1 bad line(s))"]),
        (["input=GOOD", "output=TMP"], ["cannot write output='TMP' (Is a directory)"]),
        (["onnx_path=GOOD", "question=Who?", "context=Me."], ["onnxruntime"]),
    ],
)
def test_predict_errors_name_the_key_or_file(
    compose_train, capsys, model_dir, tmp_path, overrides, fragments
) -> None:
    files = {
        "MODEL": str(model_dir / "questions.jsonl"),
        "BAD_UTF8": tmp_path / "latin1.jsonl",
        "EMPTY": tmp_path / "empty.jsonl",
        "GOOD": tmp_path / "good.jsonl",
        "TMP": str(tmp_path),
    }
    files["BAD_UTF8"].write_bytes(b'{"question": "Qui?", "context": "caf\xe9"}\n')
    files["EMPTY"].write_text('{"question": ""}\n')
    files["GOOD"].write_text(json.dumps({"question": "Who?", "context": CONTEXT}) + "\n")

    def fill(text: str) -> str:
        for name, path in files.items():
            text = text.replace(name, str(path))
        return text

    cfg = compose_predict(compose_train, model_dir, *map(fill, overrides))
    in_process_error(capsys, lambda: predict(cfg), *map(fill, fragments))
    assert not (tmp_path / "answers.jsonl").exists()


def test_predict_takes_numbers_on_the_command_line_as_text(compose_train, model_dir) -> None:
    cfg = compose_predict(compose_train, model_dir, "question=1998", "context=1998")
    answers = predict(cfg)  # Hydra parses both as int
    assert answers and answers[0]["answer"] == "1998"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_predict_on_cuda_without_a_gpu_says_so(compose_train, capsys, model_dir) -> None:
    cfg = compose_predict(compose_train, model_dir, "question=Who?", "context=Me.")
    cfg.device = "cuda"
    in_process_error(capsys, lambda: predict(cfg), "device='cuda'", "use device=cpu")


def test_predict_out_of_memory_names_batch_size(compose_train, capsys, model_dir, monkeypatch):
    def oom(self, batch):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 80 GB")

    monkeypatch.setattr(TorchLogits, "__call__", oom)
    cfg = compose_predict(compose_train, model_dir, "question=Who?", f"context='{CONTEXT}'")
    in_process_error(
        capsys,
        lambda: predict(cfg),
        "out of memory while answering (RuntimeError: DefaultCPUAllocator",
        "batch_size=32",
        "lower batch_size",
    )


def test_huge_inputs_are_answered_with_exact_offsets(model_dir, caplog) -> None:
    answerer = QuestionAnswerer.from_model_dir(model_dir, device="cpu", batch_size=64)
    long = long_context_record()
    with caplog.at_level(logging.WARNING):
        answers = answerer.answer([LONG_QUESTION, long["question"]], [CONTEXT, long["context"]], 5)
    assert "1 question(s) longer than max_question_tokens=64 tokens were truncated" in caplog.text
    for context, found in zip([CONTEXT, long["context"]], answers, strict=True):
        assert len(found) == 5
        assert_exact_offsets(context, [a.as_dict() for a in found])


def test_malformed_settings_file_names_the_file(compose_train, capsys, model_dir, tmp_path):
    broken = tmp_path / "hf_model"
    broken.mkdir()
    for path in model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "qa_lightning.json").write_text('{"max_length": "384"}')
    cfg = compose_predict(compose_train, broken, "question=Who?", "context=Me.")
    in_process_error(
        capsys,
        lambda: predict(cfg),
        f"'{broken / 'qa_lightning.json'}'",
        "max_length='384': must be an integer",
        "re-export the model",
    )


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_out_of_memory_names_eval_batch_size(
    compose_train, capsys, model_dir, monkeypatch, tmp_path
) -> None:
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(QAModule, "validation_step", oom)
    cfg = compose_train([*EVAL_OVERRIDES, f"model_dir={model_dir}"], config_name="eval")
    in_process_error(
        capsys,
        lambda: evaluate(cfg),
        "out of memory while evaluating",
        "data.eval_batch_size=16",
        "data.max_length=128",
        "halve data.eval_batch_size",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.max_length=600"], ["data.max_length=600", "at most 512 tokens"]),
        (["data.eval_batch_size=x"], ["data.eval_batch_size='x'", "must be an integer"]),
        (["postprocess.n_best=0"], ["postprocess.n_best=0"]),
        (["data.validation_samples=31"], ["data.validation_samples=31", "the 30 questions"]),
    ],
)
def test_evaluate_config_errors(compose_train, capsys, model_dir, overrides, fragments) -> None:
    cfg = compose_train([*EVAL_OVERRIDES, f"model_dir={model_dir}", *overrides], config_name="eval")
    in_process_error(capsys, lambda: evaluate(cfg), *fragments)


# -- export ------------------------------------------------------------------------------------


def test_cli_export_of_a_file_that_is_no_checkpoint(tmp_path) -> None:
    fake = tmp_path / "best.ckpt"
    fake.write_text("not a checkpoint")
    cli_error(
        run_cli("qa_lightning.export", f"ckpt_path={fake}", f"hydra.run.dir={tmp_path / 'run'}"),
        f"ckpt_path='{fake}' is not a readable PyTorch checkpoint",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["opset=latest"], ["opset='latest'", "such as 17"]),
        (["atol=-1"], ["atol=-1", "tolerance >= 0"]),
        (["out_dir=FILE"], ["out_dir='FILE' is a file"]),
        (["format=hf", "ckpt_path=FILE"], ["ckpt_path='FILE' is not a readable"]),
    ],
)
def test_export_errors_name_the_key(
    compose_train, capsys, model_dir, tmp_path, overrides, fragments
) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    overrides = [o.replace("FILE", str(file)) for o in overrides]
    if not any(o.startswith("ckpt_path") for o in overrides):
        overrides.append(f"model_dir={model_dir}")
    cfg = compose_train(overrides, config_name="export")
    fragments = [f.replace("FILE", str(file)) for f in fragments]
    in_process_error(capsys, lambda: export(cfg), *fragments)


def test_export_without_onnx_packages_says_what_to_install(
    compose_train, capsys, model_dir, monkeypatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name)
    )
    cfg = compose_train([f"model_dir={model_dir}"], config_name="export")
    in_process_error(
        capsys, lambda: export(cfg), "needs the package(s) ['onnx']", "qa-lightning[export]"
    )


def test_export_to_a_full_disk(compose_train, capsys, model_dir, monkeypatch, tmp_path) -> None:
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PretrainedConfig.save_pretrained", full)
    cfg = compose_train(
        [f"model_dir={model_dir}", f"out_dir={tmp_path / 'onnx'}"], config_name="export"
    )
    in_process_error(
        capsys,
        lambda: export(cfg),
        f"no space left on the disk of '{tmp_path}' (",
        f"while writing the export '{tmp_path / 'onnx'}' (OSError: [Errno 28] No space left",
        "nothing of it was left",
    )


# -- report ------------------------------------------------------------------------------------


def test_cli_report_of_a_missing_sweep_dir(tmp_path) -> None:
    cli_error(
        run_cli("qa_lightning.report", str(tmp_path / "nope")),
        f"sweep dir '{tmp_path / 'nope'}' does not exist",
        "outputs/train/multirun/<date>",
    )


def make_run(sweep: Path, name: str, metrics: str | None) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- model.lr={name}\n")
    if metrics is not None:
        (run / "metrics.json").write_text(metrics)
    return run


def test_report_lists_runs_with_malformed_metrics_as_failed(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", json.dumps({"best": {"f1": 50.0, "em": 40.0, "epoch": 1}}))
    make_run(sweep, "1", "[1, 2]")
    make_run(sweep, "2", json.dumps({"best": {"f1": "high", "em": 1, "epoch": 0}}))
    make_run(sweep, "3", "{not json")
    make_run(sweep, "4", None)
    assert report.main([str(sweep)]) == 0
    rows = {row["run"]: row for row in sweep_report.summarize(sweep)}
    assert rows["0"]["status"] == "ok"
    assert rows["1"]["error"] == "metrics.json is not a JSON object"
    assert rows["2"]["error"] == "metrics.json holds no validation score"
    assert rows["3"]["error"] == "unreadable metrics.json (JSONDecodeError)"
    assert "no metrics.json" in rows["4"]["error"]
    assert {p.name for p in sweep.iterdir()} >= set(sweep_report.SUMMARY_FILES)


def test_report_on_a_full_disk_says_so(tmp_path, capsys, monkeypatch) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", json.dumps({"best": {"f1": 50.0, "em": 40.0, "epoch": 1}}))

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sweep_report, "write_atomic", full)
    assert report.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: cannot write the summary to {sweep} (No space left on device: " in err
