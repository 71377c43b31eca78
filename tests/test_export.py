"""Export: training's ``hf_model/``, the export CLI (Hugging Face and ONNX), and agreement of the
exported model with predict, training and (transformers 4) the question-answering pipeline."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from qa_pipeline import TRANSFORMERS4, pipeline_answers  # benchmarks/ (pytest's pythonpath)
from safetensors.torch import load_file

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.config import resource_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.loading import load_local_file
from qa_lightning.export import export
from qa_lightning.runs.checkpoint_reading import read_checkpoint
from qa_lightning.serving.answerer import QuestionAnswerer
from tests.conftest import run_cli, train_tiny

#: Two epochs, so that the tiny model's logits are not those of its random initialisation.
EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained on the demo data; its metrics.json with ``run_dir`` added."""
    return train_tiny(tmp_path_factory.mktemp("export"), f"trainer.max_epochs={EPOCHS}")


def best_answers(answers: list) -> list[str]:
    return [found[0].text if found else "" for found in answers]


def test_training_writes_the_best_checkpoint_as_a_hf_directory(trained) -> None:
    from transformers import AutoConfig, AutoTokenizer

    hf_model = trained["run_dir"] / "hf_model"
    assert trained["hf_model"] == str(hf_model)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "qa_lightning.json"):
        assert (hf_model / name).is_file(), name
    assert AutoConfig.from_pretrained(hf_model).num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(hf_model).is_fast
    # the training run's windowing (TINY_OVERRIDES) and decoding travel with the model
    assert InferenceSettings.from_dir(hf_model) == InferenceSettings(max_length=128, stride=32)
    weights = load_file(hf_model / "model.safetensors")
    state = read_checkpoint(trained["best_checkpoint"])["state_dict"]
    assert weights.keys() == {k.removeprefix("model.") for k in state}
    for key, value in weights.items():
        assert torch.equal(value, state[f"model.{key}"]), key


def test_predict_on_the_exported_model_gives_the_training_answers(trained, validation) -> None:
    predictions = json.loads((trained["run_dir"] / "predictions.json").read_text())
    answerer = QuestionAnswerer.from_model_dir(
        trained["run_dir"] / "hf_model", device="cpu", precision="32-true"
    )
    answers = best_answers(answerer.answer(validation["question"], validation["context"]))
    same = sum(predictions[qid] == a for qid, a in zip(validation["id"], answers, strict=True))
    assert same / len(answers) >= 0.99, f"{same}/{len(answers)}"


def test_predict_answers_with_a_checkpoint_as_with_its_hf_model(
    compose_train, trained, tmp_path
) -> None:
    """predict takes ckpt_path= as evaluate, export and serve do: the best checkpoint answers
    exactly as the hf_model/ that training exported from it."""
    from qa_lightning.predict import predict

    questions = tmp_path / "questions.jsonl"
    examples = load_local_file(resource_path("demo/validation.json"))
    questions.write_text(
        "".join(
            json.dumps({"id": e["id"], "question": e["question"], "context": e["context"]}) + "\n"
            for e in examples
        )
    )
    rows = {}
    for key, path in (
        ("ckpt_path", trained["best_checkpoint"]),
        ("model_dir", trained["run_dir"] / "hf_model"),
    ):
        output = tmp_path / f"{key}.jsonl"
        overrides = [f"{key}={path}", f"input={questions}", f"output={output}", "top_k=3"]
        cfg = compose_train(
            [*overrides, "device=cpu", "precision=32-true", "progress=false"],
            config_name="predict",
        )
        assert predict(cfg)["answered"] == len(examples)
        rows[key] = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows["ckpt_path"] == rows["model_dir"]


def test_question_answering_pipeline_loads_the_exported_model(trained, validation) -> None:
    """The transformers 4 pipeline (transformers 5 removed it) loads ``hf_model/``.

    It runs in its own process with ``make test``'s transformers 4 folder on its path. Its best
    answers match predict's where its decoding is the same as ours: one window and no word
    alignment. It differs by design elsewhere: with ``align_to_words`` (its default) it widens
    spans to whole words, and it compares windows by per-window probabilities instead of logits,
    which changes answers when logits are flat (the tiny model's).
    """
    if not TRANSFORMERS4.is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: `make setup` installs transformers 4 there")
    hf_model = trained["run_dir"] / "hf_model"
    settings = InferenceSettings.from_dir(hf_model)
    answerer = QuestionAnswerer.from_model_dir(hf_model, device="cpu", precision="32-true")
    ours = best_answers(answerer.answer(validation["question"], validation["context"]))
    rows = [
        {"question": q, "context": c}
        for q, c in zip(validation["question"], validation["context"], strict=True)
    ]
    runs = {
        run["align_to_words"]: run for run in pipeline_answers(hf_model, rows, asdict(settings))
    }
    assert runs[True]["transformers"].startswith("4.")
    single_window = [
        len(answerer.tokenizer(q, c)["input_ids"]) <= settings.max_length
        for q, c in zip(validation["question"], validation["context"], strict=True)
    ]
    compared = [
        (a, b) for a, b, one in zip(runs[False]["answers"], ours, single_window, strict=True) if one
    ]
    same = sum(a == b for a, b in compared)
    assert len(compared) >= 20
    assert same / len(compared) >= 0.99, f"{same}/{len(compared)}"


def test_onnx_export_matches_torch_and_predicts_the_same_answers(
    trained, validation, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    out_dir = tmp_path / "onnx"
    result = run_cli(
        "qa_lightning.export",
        f"ckpt_path={trained['best_checkpoint']}",
        "format=onnx",
        f"out_dir={out_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(re.search(r"onnxruntime vs PyTorch: (\S+)", result.stdout).group(1))
    assert diff < 1e-4
    assert (out_dir / "model.onnx").is_file() and (out_dir / "tokenizer.json").is_file()

    questions, contexts = validation["question"], validation["context"]
    torch_answers = QuestionAnswerer.from_model_dir(
        trained["hf_model"], device="cpu", precision="32-true"
    ).answer(questions, contexts, top_k=3)
    onnx_answers = QuestionAnswerer.from_onnx(out_dir / "model.onnx").answer(
        questions, contexts, top_k=3
    )
    for t, o in zip(torch_answers, onnx_answers, strict=True):
        assert [(a.text, a.start, a.end) for a in t] == [(a.text, a.start, a.end) for a in o]
        assert [a.score for a in t] == pytest.approx([a.score for a in o], abs=1e-5)


def test_hf_export_of_a_checkpoint_equals_trainings(compose_train, trained, tmp_path) -> None:
    cfg = compose_train(
        [f"ckpt_path={trained['best_checkpoint']}", "format=hf"], config_name="export"
    )
    written = export(cfg)
    assert written["path"] == str(tmp_path / "run" / "hf_model")
    ours = load_file(Path(written["path"]) / "model.safetensors")
    trainings = load_file(trained["run_dir"] / "hf_model" / "model.safetensors")
    assert ours.keys() == trainings.keys()
    assert all(torch.equal(ours[k], trainings[k]) for k in ours)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "give exactly one of model_dir=PATH"),
        (["ckpt_path=a", "model_dir=b"], "give exactly one of model_dir=PATH"),
        (["format=tflite", "ckpt_path=a"], "format='tflite'; use one of"),
        (["format=hf", "model_dir=."], "format=hf exports a checkpoint"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt' does not exist"),
    ],
)
def test_export_config_errors(compose_train, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        export(compose_train(overrides, config_name="export"))


def test_a_failed_export_at_the_end_of_training_keeps_the_run(tmp_path: Path, caplog) -> None:
    from qa_lightning.serving.exports import try_export_hf

    sharded = tmp_path / "best.ckpt"
    sharded.mkdir()  # e.g. DeepSpeed writes checkpoint directories
    assert try_export_hf(sharded, tmp_path / "hf_model") is None
    assert f"retry with python -m qa_lightning.export ckpt_path={sharded} format=hf" in caplog.text
