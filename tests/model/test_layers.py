"""Students made from a bigger model (``model.keep_layers``): the kept layers' weights, ordinary
Hugging Face exports, checkpoints that rebuild the student, and clear errors for bad lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AlbertConfig, AutoConfig, AutoModelForQuestionAnswering

from qa_lightning.core.config import minilm_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.model import load_qa_model
from qa_lightning.model.layers import check_keep_layers
from qa_lightning.runs.checkpoint_reading import checkpoint_model_config, load_checkpoint
from qa_lightning.runs.config import validate_train_config
from tests.model.encoders import SIZES, small_configs

#: Random 4-layer encoders of three families.
CONFIGS = {family: make for family, make in small_configs(4).items() if family != "electra"}
KEEP = [0, 2, 3]
LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")


@pytest.fixture(params=sorted(CONFIGS))
def source(request, tmp_path: Path) -> Path:
    """A saved random 4-layer QA model of one family."""
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(CONFIGS[request.param]())
    model.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def source_key(student_key: str, keep: list[int]) -> str:
    """The source's name of a student weight: layer j of the student is layer keep[j]."""
    return LAYER_INDEX.sub(lambda m: f".layer.{keep[int(m.group(1))]}.", student_key)


def test_student_holds_the_embeddings_head_and_chosen_layers_of_its_source(source) -> None:
    full = load_qa_model(str(source)).state_dict()
    student = load_qa_model(str(source), keep_layers=KEEP)
    assert student.config.num_hidden_layers == len(KEEP)
    state = student.state_dict()
    layers = {int(m.group(1)) for key in state if (m := LAYER_INDEX.search(key))}
    assert layers == set(range(len(KEEP)))
    assert len(state) == len(full) - len([k for k in full if ".layer.1." in k])
    for key, value in state.items():  # student layers 1, 2 are source layers 2, 3
        assert torch.equal(value, full[source_key(key, KEEP)]), key


def test_student_export_is_an_ordinary_hf_directory(source, tmp_path: Path) -> None:
    student = load_qa_model(str(source), keep_layers=KEEP).eval()
    student.save_pretrained(tmp_path / "student")
    config = AutoConfig.from_pretrained(tmp_path / "student")
    assert config.num_hidden_layers == len(KEEP)
    if config.model_type == "distilbert":
        assert config.to_dict()["n_layers"] == len(KEEP)
    loaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "student").eval()
    assert loaded.state_dict().keys() == student.state_dict().keys()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected, actual = student(input_ids=input_ids), loaded(input_ids=input_ids)
    torch.testing.assert_close(actual.start_logits, expected.start_logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.end_logits, expected.end_logits, rtol=0, atol=0)


def test_a_students_checkpoint_rebuilds_the_student(source, tmp_path: Path) -> None:
    """Checkpoints hold name_or_path and keep_layers: the architecture is the source's config
    with num_hidden_layers = the kept count, and the checkpoint's weights fit it."""
    student = load_qa_model(str(source), keep_layers=KEEP)
    checkpoint = {
        "hyper_parameters": {
            "name_or_path": str(source),
            "config_overrides": None,
            "keep_layers": KEEP,
        },
        "datamodule_hyper_parameters": {"tokenizer_name_or_path": minilm_path()},
        "state_dict": {f"model.{k}": v for k, v in student.state_dict().items()},
    }
    assert checkpoint_model_config(checkpoint, "x.ckpt")["config_overrides"] == {
        "num_hidden_layers": len(KEEP)
    }
    torch.save(checkpoint, tmp_path / "student.ckpt")
    rebuilt = load_checkpoint(tmp_path / "student.ckpt").model
    assert rebuilt.config.num_hidden_layers == len(KEEP)
    for (name, value), expected in zip(
        rebuilt.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name


def test_keep_layers_applies_after_config_overrides_from_scratch() -> None:
    overrides = {
        "num_hidden_layers": 3,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    model = load_qa_model(minilm_path(), True, overrides, keep_layers=[2])
    assert model.config.num_hidden_layers == 1
    assert len(model.bert.encoder.layer) == 1


@pytest.mark.parametrize(
    ("keep_layers", "message"),
    [
        ([], "keeps no layer"),
        ([0, 0], "increasing order, each once"),
        ([2, 1], "increasing order, each once"),
        ([-1, 1], "increasing order"),
        ([0, 4], "the model has 4 layers, numbered 0 to 3"),
        ([0.5], "must be integers"),
        ([True], "must be integers"),
        ("0,2", "give a list of layer indices"),
        (2, "give a list of layer indices"),
    ],
)
def test_invalid_lists_are_clear_errors(keep_layers, message: str) -> None:
    with pytest.raises(ConfigError, match="model.keep_layers") as error:
        check_keep_layers(keep_layers, num_layers=4)
    assert message in str(error.value)


def test_config_check_knows_the_models_layer_count(compose_train) -> None:
    """model=tiny has 2 layers: layer 2 does not exist, before any data or weights are read."""
    with pytest.raises(ConfigError, match=r"model.keep_layers=\[0, 2\]; the model has 2 layers"):
        validate_train_config(compose_train(["model=tiny", "data=demo", "model.keep_layers=[0,2]"]))
    validate_train_config(compose_train(["model=tiny", "data=demo", "model.keep_layers=[1]"]))


def test_an_encoder_without_a_layer_list_is_a_clear_error() -> None:
    albert = AutoModelForQuestionAnswering.from_config(
        AlbertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, **SIZES)
    )
    from qa_lightning.model.layers import select_layers

    with pytest.raises(ConfigError, match="not supported for AlbertForQuestionAnswering"):
        select_layers(albert, [0])
