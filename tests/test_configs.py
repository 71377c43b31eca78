"""Every config group composes, instantiates (without loading weights) and validates."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core import config
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.config import validate_data_config
from qa_lightning.data.windowing import windowing_problem
from qa_lightning.runs.config import validate_train_config
from tests.conftest import CONF_DIR

GROUPS = ["data", "model", "trainer", "callbacks", "logger", "paths", "experiment"]
# data=local needs its files: give it the shipped demo files (data=mrqa too: only their existence
# is checked here)
FILLED = {
    "local": [
        "data.train_file=${qa_resource:demo/train.json}",
        "data.validation_file=${qa_resource:demo/validation.json}",
    ]
}
FILLED["mrqa"] = FILLED["local"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_group_option_composes(compose_train, monkeypatch, group: str, option: str) -> None:
    # the GPU trainers as on a machine with a GPU (without one: the next test)
    monkeypatch.setattr("qa_lightning.runs.config.missing_gpu_error", lambda accelerator: None)
    cfg = compose_train([f"{group}={option}", *FILLED.get(option, [])])
    OmegaConf.resolve(cfg)
    validate_train_config(cfg)
    for node in (cfg.data, cfg.model, cfg.trainer):
        assert get_class(node._target_)


@pytest.mark.parametrize("option", ["gpu", "ddp", "fsdp", "deepspeed"])
def test_a_gpu_trainer_without_a_gpu_names_the_cpu_trainers(compose_train, monkeypatch, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_train([f"trainer={option}"])
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu .* trainer=cpu"):
        validate_train_config(cfg)


def test_groups_have_the_documented_options() -> None:
    assert {"sample", "full", "local", "demo"} <= set(options("data"))
    assert {"distilbert_base_uncased", "bert_base_cased", "roberta_base", "minilm", "tiny"} <= set(
        options("model")
    )
    assert {"default", "cpu", "gpu"} <= set(options("trainer"))


def test_defaults_match_the_reference_recipe(compose_train) -> None:
    cfg = compose_train()
    assert cfg.data.train_samples == 2000 and cfg.data.sample_seed == 42
    assert (cfg.data.max_length, cfg.data.stride) == (384, 128)
    assert (cfg.model.lr, cfg.model.weight_decay) == (2e-5, 0.01)
    assert (cfg.postprocess.n_best, cfg.postprocess.max_answer_length) == (20, 30)
    assert (cfg.model.n_best, cfg.model.max_answer_length) == (20, 30)  # wired to the module
    assert cfg.data.batch_size == 8
    assert cfg.model.name_or_path == "distilbert-base-uncased"
    assert cfg.trainer.gradient_clip_val is None  # 1.0 cost 4.3 F1 (docs/accuracy.md)


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_leaves_sharding_to_the_data_module(compose_train, option: str) -> None:
    trainer = compose_train([f"trainer={option}"]).trainer
    assert trainer.use_distributed_sampler is False
    assert trainer.gradient_clip_val is None  # off unless asked for (not by norm under FSDP)


def test_cpu_trainer_is_fp32(compose_train) -> None:
    assert compose_train(["trainer=cpu"]).trainer.precision == "32-true"


@pytest.mark.parametrize(("native_bf16", "precision"), [(True, "bf16-mixed"), (False, "32-true")])
def test_default_trainer_on_a_cpu_uses_bf16_only_where_native(
    compose_train, monkeypatch, native_bf16: bool, precision: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "cpu_supports_bf16", lambda: native_bf16)
    assert compose_train().trainer.precision == precision


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.stride=384", "data.stride"),
        ("data.stride=330", "data.stride"),  # leaves no room for 64 question tokens
        ("data.max_length=0", "data.max_length"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.train_samples=-5", "data.train_samples"),
        ("model.lr=0", "model.lr"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
        ("data.on_bad_record=ignore", "data.on_bad_record"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(compose_train, override: str, key: str) -> None:
    cfg = compose_train([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train_config(cfg)


def test_local_data_without_files_names_the_missing_keys(compose_train) -> None:
    cfg = compose_train(["data=local"])
    with pytest.raises(ConfigError, match=r"data\.train_file"):
        validate_train_config(cfg)


def test_missing_data_file_is_reported(compose_train, tmp_path) -> None:
    cfg = compose_train(
        [
            "data=local",
            f"data.train_file={tmp_path}/nope.json",
            f"data.validation_file={tmp_path}/nope.json",
        ]
    )
    with pytest.raises(ConfigError, match="nope.json"):
        validate_train_config(cfg)


@dataclass
class Sizes:
    """A schema as the config's: a required integer, an optional number and a switch."""

    size: int = field(metadata={"example": "8"})
    ratio: float | None = 0.1
    flag: bool = True


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"size": 8}, None),
        ({"size": 8, "ratio": 1, "flag": False, "other": "x"}, None),  # an int is a number
        ({"size": 8, "ratio": None}, None),
        ({}, ("g.size", None, "set it (e.g. g.size=8).")),
        ({"size": None}, ("g.size", None, "set it (e.g. g.size=8).")),
        ({"size": "8"}, ("g.size", "8", "must be an integer (e.g. g.size=8).")),  # not converted
        ({"size": 2.5}, ("g.size", 2.5, "must be an integer (e.g. g.size=8).")),
        ({"size": True}, ("g.size", True, "must be an integer (e.g. g.size=8).")),
        ({"size": 8, "ratio": "fast"}, ("g.ratio", "fast", "must be a number (e.g. g.ratio=0.1).")),
        ({"size": 8, "flag": 1}, ("g.flag", 1, "must be true or false.")),
        ({"size": 8, "flag": "yes"}, ("g.flag", "yes", "must be true or false.")),
    ],
)
def test_type_problem_checks_the_schemas_types_on_values_as_given(values, problem) -> None:
    assert config.type_problem(OmegaConf.create(values), Sizes, "g.") == problem


def test_the_windowing_rule_is_one_for_configs_and_exported_settings() -> None:
    # 128 - 64 question tokens - 4 special tokens leave 60 context tokens: stride 60 is too large
    assert windowing_problem(128, 59, 64) is None
    key, value, fix = windowing_problem(128, 60, 64, "data.")
    assert (key, value) == ("data.stride", 60) and "leaving 60 context tokens" in fix
    data = {"max_length": 128, "stride": 60, "max_question_tokens": 64, "batch_size": 8}
    with pytest.raises(ConfigError) as from_config:
        validate_data_config(OmegaConf.create({**data, "eval_batch_size": 8}))
    with pytest.raises(ConfigError) as from_settings:
        InferenceSettings(max_length=128, stride=60, max_question_tokens=64)
    assert str(from_config.value) == f"invalid config: data.stride=60; {fix}"
    assert str(from_settings.value) == (
        f"invalid setting stride=60: {windowing_problem(128, 60, 64)[2]}"
    )
