"""A checkpoint carries its model: config and tokenizer files, windowing and decoding.

The tiny model is trained against a private copy of its base directory (config and tokenizer),
which is then deleted, and the checkpoint moved: evaluation, export and prediction still work
and give training's answers, with training's windowing and decoding unless overridden.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.data.loading import load_local_file
from qa_lightning.evaluate import evaluate, use_saved_settings
from qa_lightning.export import export
from qa_lightning.model.files import CHECKPOINT_KEY, model_files, write_model_files
from qa_lightning.runs.checkpoint_reading import (
    checkpoint_settings,
    read_checkpoint,
    tuned_null_threshold,
)
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.train import train
from tests.conftest import CONF_DIR, TINY_OVERRIDES, run_cli

#: Base files of the tiny model: MiniLM's config and tokenizer, not its weights.
BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
#: Decoding other than the reference's (20, 30), so that evaluating with it shows.
DECODING = ["postprocess.n_best=5", "postprocess.max_answer_length=10"]
#: What evaluation is given: the data and trainer, none of the windowing or decoding.
EVAL_DATA = ["data=demo", "trainer=cpu"]


def compose_config(
    name: str, overrides: list[str], output_dir: Path, cache_dir: Path
) -> DictConfig:
    """``conf/<name>.yaml`` composed with ``overrides``, as Hydra would (its overrides are
    known to ``HydraConfig``), writing to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def plain(value) -> bool:
    """``value`` is made of the types ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> dict:
    """A tiny model trained against a private base directory, which is then deleted; its best
    checkpoint moved elsewhere. Training's metrics with ``checkpoint`` (the moved file)."""
    tmp = tmp_path_factory.mktemp("portable")
    base = tmp / "base"
    base.mkdir()
    for name in BASE_FILES:
        shutil.copy(Path(minilm_path()) / name, base / name)
    cfg = compose_config(
        "train", [*TINY_OVERRIDES, *DECODING, f"model.name_or_path={base}"], tmp / "run", tmp
    )
    metrics = train(cfg)
    shutil.rmtree(base)
    moved = tmp / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.move(metrics["best_checkpoint"], moved)
    predictions = json.loads((tmp / "run" / "predictions.json").read_text())
    return {**metrics, "checkpoint": moved, "tmp": tmp, "base": base, "predictions": predictions}


def test_the_checkpoint_holds_config_and_tokenizer_as_plain_values(portable) -> None:
    checkpoint = read_checkpoint(portable["checkpoint"])
    files = checkpoint[CHECKPOINT_KEY]
    assert plain(files)  # loadable with torch.load(weights_only=True)
    assert files["config"]["num_hidden_layers"] == 2 and files["config"]["hidden_size"] == 32
    assert {"tokenizer.json", "tokenizer_config.json"} <= files["tokenizer"].keys()
    assert checkpoint_settings(checkpoint) == {
        "max_length": 128,
        "stride": 32,
        "max_question_tokens": 64,
        "n_best": 5,
        "max_answer_length": 10,
        "version_2_with_negative": False,
        "null_score_diff_threshold": 0.0,
    }


@pytest.fixture(scope="module")
def evaluated(portable) -> tuple[dict, str]:
    """``evaluate`` of the moved checkpoint, given no windowing or decoding; its log."""
    out = portable["tmp"] / "eval"
    cfg = compose_config(
        "eval", [*EVAL_DATA, f"ckpt_path={portable['checkpoint']}"], out, portable["tmp"]
    )
    logger = logging.getLogger("qa_lightning.evaluate")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        scores = evaluate(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return scores, "\n".join(records)


def test_evaluate_reproduces_training_without_the_base_or_its_settings(portable, evaluated) -> None:
    scores, log_text = evaluated
    out = portable["tmp"] / "eval"
    # exact equality: training's windows (128/32), decoding (5/10), model and tokenizer
    assert (scores["f1"], scores["em"]) == (portable["best"]["f1"], portable["best"]["em"])
    assert json.loads((out / "predictions.json").read_text()) == portable["predictions"]
    resolved = OmegaConf.load(out / "config_resolved.yaml")
    assert (resolved.data.max_length, resolved.data.stride) == (128, 32)
    assert (resolved.model.n_best, resolved.model.max_answer_length) == (5, 10)
    assert "windowing and decoding of the checkpoint: data.max_length=128, data.stride=32" in (
        log_text
    )
    assert "postprocess.n_best=5, postprocess.max_answer_length=10" in log_text
    assert not portable["base"].exists()


def test_a_command_line_setting_wins_over_the_checkpoints(portable, evaluated, caplog) -> None:
    given = [*EVAL_DATA, f"ckpt_path={portable['checkpoint']}", "data.max_length=256"]
    out = portable["tmp"] / "eval_override"
    with caplog.at_level(logging.INFO, logger="qa_lightning.evaluate"):
        scores = evaluate(compose_config("eval", given, out, portable["tmp"]))
    assert "data.max_length=256 (command line; the checkpoint's: 128)" in caplog.text
    resolved = OmegaConf.load(out / "config_resolved.yaml")
    assert (resolved.data.max_length, resolved.data.stride, resolved.model.n_best) == (256, 32, 5)
    assert scores["questions"] == evaluated[0]["questions"] == 30
    assert scores["windows"] < evaluated[0]["windows"]  # fewer, longer windows


def test_export_and_predict_without_the_base(portable) -> None:
    out = portable["tmp"] / "export"
    cfg = compose_config(
        "export",
        [f"ckpt_path={portable['checkpoint']}", "format=hf", f"out_dir={out}"],
        out.parent / "export_run",
        portable["tmp"],
    )
    export(cfg)
    assert InferenceSettings.from_dir(out) == InferenceSettings(
        max_length=128, stride=32, n_best=5, max_answer_length=10
    )
    validation = load_local_file(resource_path("demo/validation.json"))
    answerer = QuestionAnswerer.from_model_dir(out, device="cpu", precision="32-true")
    answers = answerer.answer(validation["question"], validation["context"])
    texts = [found[0].text if found else "" for found in answers]
    predictions = portable["predictions"]
    same = sum(predictions[qid] == a for qid, a in zip(validation["id"], texts, strict=True))
    assert same / len(texts) >= 0.99, f"{same}/{len(texts)}"


@pytest.fixture(scope="module")
def earlier_checkpoint(portable) -> Path:
    """The checkpoint as an earlier version wrote it: no embedded files, its base gone."""
    checkpoint = torch.load(portable["checkpoint"], map_location="cpu", weights_only=False)
    del checkpoint[CHECKPOINT_KEY]
    path = portable["tmp"] / "earlier.ckpt"
    torch.save(checkpoint, path)
    return path


def test_an_earlier_checkpoint_whose_base_is_gone_is_a_clear_error(
    portable, earlier_checkpoint
) -> None:
    cfg = compose_config(
        "eval",
        [*EVAL_DATA, f"ckpt_path={earlier_checkpoint}"],
        portable["tmp"] / "eval_failed",
        portable["tmp"],
    )
    with pytest.raises(ConfigError) as raised:
        evaluate(cfg)
    message = str(raised.value)
    assert "it holds no model config (base" in message
    assert "and no tokenizer files (base" in message
    assert f"base '{portable['base']}'" in message
    assert f"python -m qa_lightning.export ckpt_path={earlier_checkpoint} format=hf" in message

    result = run_cli(
        "qa_lightning.export",
        f"ckpt_path={earlier_checkpoint}",
        "format=hf",
        f"hydra.run.dir={portable['tmp'] / 'export_failed'}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "it holds no model config" in result.stderr


def test_an_earlier_checkpoint_loads_where_its_base_is_reachable(
    portable, earlier_checkpoint
) -> None:
    base = portable["base"]
    base.mkdir()
    try:
        for name in BASE_FILES:
            shutil.copy(Path(minilm_path()) / name, base / name)
        out = portable["tmp"] / "eval_earlier"
        scores = evaluate(
            compose_config(
                "eval", [*EVAL_DATA, f"ckpt_path={earlier_checkpoint}"], out, portable["tmp"]
            )
        )
    finally:
        shutil.rmtree(base)
    assert (scores["f1"], scores["em"]) == (portable["best"]["f1"], portable["best"]["em"])
    assert not (out / "checkpoint_model").exists()


def test_saved_settings_yield_to_the_command_line() -> None:
    cfg = OmegaConf.create(
        {
            "data": {"max_length": 384, "stride": 128, "version_2_with_negative": False},
            "postprocess": {"n_best": 20, "null_score_diff_threshold": 0.0},
            "model": {"n_best": 7},
        }
    )
    saved = {"max_length": 128, "stride": 32, "n_best": 5, "null_score_diff_threshold": "best"}
    origins = use_saved_settings(cfg, saved, "checkpoint", {"data.stride", "model.n_best"})
    assert origins == {
        "data.max_length": "checkpoint",
        "data.stride": "command line",
        "postprocess.n_best": "command line",
        "postprocess.null_score_diff_threshold": "checkpoint",
    }
    assert (cfg.data.max_length, cfg.data.stride, cfg.postprocess.n_best) == (128, 128, 20)
    assert cfg.postprocess.null_score_diff_threshold == "best"


def test_model_files_round_trip_text_and_binary_files(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from qa_lightning.core.tokenizer import load_tokenizer

    class WithBinaryFile:
        """A tokenizer whose files include a binary one (as a SentencePiece model)."""

        def __init__(self, tokenizer) -> None:
            self.tokenizer = tokenizer

        def save_pretrained(self, directory: str) -> None:
            self.tokenizer.save_pretrained(directory)
            (Path(directory) / "spiece.model").write_bytes(bytes(range(256)))

    config = AutoConfig.from_pretrained(minilm_path(), num_hidden_layers=2)
    tokenizer = load_tokenizer(minilm_path())
    files = model_files(config, WithBinaryFile(tokenizer))
    assert plain(files) and list(files["tokenizer_base64"]) == ["spiece.model"]
    directory = write_model_files(files, tmp_path / "model")
    assert (directory / "spiece.model").read_bytes() == bytes(range(256))
    rebuilt = AutoConfig.from_pretrained(directory).to_dict()
    expected = config.to_dict()
    for values in (rebuilt, expected):
        values.pop("_name_or_path", None)
    assert rebuilt == expected
    text = "Who wrote the report in 1998?"
    assert load_tokenizer(str(directory))(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_embedded_file_names_cannot_leave_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside its model directory"):
        write_model_files({"tokenizer": {"../evil.txt": "x"}}, tmp_path / "model")


def test_best_threshold_needs_a_validation(tmp_path: Path) -> None:
    assert tuned_null_threshold({"qa_last": {"scores": {"best_f1_thresh": -1.5}}}, "a.ckpt") == -1.5
    with pytest.raises(ExportError, match="holds no validation's best_f1_thresh"):
        tuned_null_threshold({"qa_last": {"scores": {}}}, "a.ckpt")
