"""Narrower feed-forward layers (``model.ffn_width``): hand-checked neuron choice, ordinary
Hugging Face exports that plain transformers loads, the full width changing nothing, widths with
``keep_layers``, checkpoints that rebuild the model, clear errors, and a distilled run end to end
(train -> evaluate and ONNX export from its checkpoint)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoConfig,
    AutoModelForQuestionAnswering,
    BertConfig,
)

from qa_lightning.core.config import minilm_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.evaluate import evaluate
from qa_lightning.export import export
from qa_lightning.model import load_qa_model
from qa_lightning.model.files import CHECKPOINT_KEY, model_files
from qa_lightning.model.width import (
    check_ffn_width,
    kept_neurons,
    neuron_importance,
    prune_ffn,
)
from qa_lightning.runs.checkpoint_reading import checkpoint_model_config, load_checkpoint
from qa_lightning.runs.config import validate_train_config
from tests.conftest import EVAL_OVERRIDES, TINY_OVERRIDES, run_cli
from tests.model.encoders import SIZES, small_configs
from tests.test_errors import cli_error

#: Random 3-layer encoders with 32 feed-forward neurons.
CONFIGS = small_configs(3)
#: The feed-forward block's input and output weights, and the width's config key, by family.
FFN = {
    "distilbert": ("ffn.lin1", "ffn.lin2", "hidden_dim"),
    "other": ("intermediate.dense", "output.dense", "intermediate_size"),
}
WIDTH = 12
INPUT_IDS = [[101, 2040, 2626, 1996, 3189, 1029, 102, 1996, 2837, 102]]


def ffn_names(model_type: str) -> tuple[str, str, str]:
    return FFN.get(model_type, FFN["other"])


def layer_weights(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Feed-forward weights and biases of layer ``index``: ``in.weight``, ``in.bias``, ..."""
    w_in, w_out, _ = ffn_names(model.config.model_type)
    layer = model.base_model.get_submodule(
        "transformer.layer" if model.config.model_type == "distilbert" else "encoder.layer"
    )[index]
    return {
        f"{side}.{kind}": getattr(layer.get_submodule(path), kind).detach()
        for side, path in (("in", w_in), ("out", w_out))
        for kind in ("weight", "bias")
    }


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def source(request, tmp_path_factory) -> Path:
    """A saved random 3-layer QA model of one family."""
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(CONFIGS[request.param]())
    directory = tmp_path_factory.mktemp(request.param) / "source"
    model.save_pretrained(directory)
    return directory


def logits(model: torch.nn.Module) -> list[list[float]]:
    with torch.no_grad():
        outputs = model.eval()(input_ids=torch.tensor(INPUT_IDS))
    return [outputs.start_logits[0].tolist(), outputs.end_logits[0].tolist()]


# -- the choice of neurons ----------------------------------------------------------------------


def test_importance_is_the_product_of_the_in_row_and_out_column_norms() -> None:
    w_in = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])  # row norms 5, 1, 2
    w_out = torch.tensor([[1.0, 0.0, 3.0], [0.0, -2.0, 4.0]])  # column norms 1, 2, 5
    assert neuron_importance(w_in, w_out).tolist() == [5.0, 2.0, 10.0]


def test_the_most_important_neurons_are_kept_in_their_order_ties_by_index() -> None:
    assert kept_neurons(torch.tensor([1.0, 3.0, 2.0, 4.0]), 2).tolist() == [1, 3]
    assert kept_neurons(torch.tensor([1.0, 3.0, 2.0, 4.0]), 3).tolist() == [1, 2, 3]
    ties = torch.tensor([2.0, 3.0, 2.0, 2.0, 1.0])
    assert kept_neurons(ties, 1).tolist() == [1]
    assert kept_neurons(ties, 2).tolist() == [0, 1]
    assert kept_neurons(ties, 3).tolist() == [0, 1, 2]


def test_a_layer_with_known_weights_keeps_the_hand_picked_neurons() -> None:
    """Neuron importances 1, 3, 2, 4 in layer 0 and 4, 1, 3, 2 in layer 1: width 2 keeps
    neurons 1 and 3 of layer 0 and 0 and 2 of layer 1, rows of W_in and columns of W_out in
    their original order; W_out's bias is untouched."""
    config = BertConfig(
        hidden_size=2, num_hidden_layers=2, num_attention_heads=1, intermediate_size=4, **SIZES
    )
    model = AutoModelForQuestionAnswering.from_config(config)
    w_out = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]])  # column norms 1, 1, 1, 2
    rows = {
        0: torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, -2.0]]),  # norms 1, 3, 2, 2
        1: torch.tensor([[0.0, 4.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]),  # norms 4, 1, 3, 1
    }
    with torch.no_grad():
        for index, layer in enumerate(model.bert.encoder.layer):
            layer.intermediate.dense.weight.copy_(rows[index])
            layer.intermediate.dense.bias.copy_(torch.tensor([10.0, 11.0, 12.0, 13.0]))
            layer.output.dense.weight.copy_(w_out)
            layer.output.dense.bias.copy_(torch.tensor([-1.0, -2.0]))
    prune_ffn(model, 2)
    assert model.config.intermediate_size == 2
    expected = {0: [1, 3], 1: [0, 2]}
    for index, kept in expected.items():
        weights = layer_weights(model, index)
        assert torch.equal(weights["in.weight"], rows[index][kept])
        assert weights["in.bias"].tolist() == [10.0 + k for k in kept]
        assert torch.equal(weights["out.weight"], w_out[:, kept])
        assert weights["out.bias"].tolist() == [-1.0, -2.0]


def test_each_layer_keeps_its_own_most_important_neurons(source) -> None:
    full = load_qa_model(str(source))
    pruned = load_qa_model(str(source), ffn_width=WIDTH)
    _, _, key = ffn_names(full.config.model_type)
    assert getattr(pruned.config, key) == WIDTH
    for index in range(3):
        before, after = layer_weights(full, index), layer_weights(pruned, index)
        kept = kept_neurons(neuron_importance(before["in.weight"], before["out.weight"]), WIDTH)
        assert len(kept) == WIDTH and kept.tolist() == sorted(kept.tolist())
        assert torch.equal(after["in.weight"], before["in.weight"][kept])
        assert torch.equal(after["in.bias"], before["in.bias"][kept])
        assert torch.equal(after["out.weight"], before["out.weight"][:, kept])
        assert torch.equal(after["out.bias"], before["out.bias"])
    # everything outside the feed-forward blocks is the source's
    w_in, w_out, _ = ffn_names(full.config.model_type)
    sliced = re.compile(rf"\.layer\.\d+\.({re.escape(w_in)}|{re.escape(w_out)})\.")
    full_state = full.state_dict()
    for name, value in pruned.state_dict().items():
        if not sliced.search(name):
            assert torch.equal(value, full_state[name]), name


def test_the_full_width_changes_nothing(source) -> None:
    full = load_qa_model(str(source))
    width = getattr(full.config, ffn_names(full.config.model_type)[2])
    same = load_qa_model(str(source), ffn_width=width)
    assert same.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in same.state_dict().items())
    assert logits(same) == logits(full)


def test_layers_are_chosen_first_then_narrowed(source) -> None:
    full = load_qa_model(str(source))
    student = load_qa_model(str(source), keep_layers=[0, 2], ffn_width=WIDTH)
    assert student.config.num_hidden_layers == 2
    assert getattr(student.config, ffn_names(full.config.model_type)[2]) == WIDTH
    for index, source_index in enumerate([0, 2]):
        before, after = layer_weights(full, source_index), layer_weights(student, index)
        kept = kept_neurons(neuron_importance(before["in.weight"], before["out.weight"]), WIDTH)
        assert torch.equal(after["in.weight"], before["in.weight"][kept])
        assert torch.equal(after["out.weight"], before["out.weight"][:, kept])


# -- plain transformers loads the result ----------------------------------------------------------

#: Loads each directory with transformers alone and prints its logits (no qa_lightning import).
PLAIN_LOADER = """
import json, sys
import torch
from transformers import AutoModelForQuestionAnswering
result = {}
for directory in sys.argv[2:]:
    model = AutoModelForQuestionAnswering.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(json.loads(sys.argv[1])))
    result[directory] = [out.start_logits[0].tolist(), out.end_logits[0].tolist()]
assert not any(name.startswith("qa_lightning") for name in sys.modules)
print(json.dumps(result))
"""


def test_narrowed_models_save_as_plain_hugging_face_directories(tmp_path: Path) -> None:
    """Each family, narrowed and with two of its layers, saved with save_pretrained: a process
    that imports only transformers loads it and computes the in-memory model's logits."""
    expected = {}
    for name, make_config in CONFIGS.items():
        torch.manual_seed(0)
        AutoModelForQuestionAnswering.from_config(make_config()).save_pretrained(tmp_path / name)
        model = load_qa_model(str(tmp_path / name), keep_layers=[0, 2], ffn_width=WIDTH)
        directory = tmp_path / f"{name}_narrow"
        model.save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        assert config[ffn_names(config["model_type"])[2]] == WIDTH
        if config["model_type"] == "distilbert":
            assert "intermediate_size" not in config
        expected[str(directory)] = logits(model)
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, json.dumps(INPUT_IDS), *expected],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.keys() == expected.keys()
    for directory, (start, end) in expected.items():
        torch.testing.assert_close(torch.tensor(loaded[directory][0]), torch.tensor(start))
        torch.testing.assert_close(torch.tensor(loaded[directory][1]), torch.tensor(end))
    assert AutoConfig.from_pretrained(tmp_path / "bert_narrow").intermediate_size == WIDTH


# -- checkpoints rebuild the narrowed model -------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True], ids=["base-config", "embedded-config"])
def test_a_narrowed_checkpoint_rebuilds_its_model(source, tmp_path: Path, embedded) -> None:
    """Checkpoints hold name_or_path, keep_layers and ffn_width: the architecture is the source's
    config with the kept layer count and width (DistilBERT: hidden_dim), or the config embedded
    in the checkpoint; the checkpoint's weights fit it."""
    student = load_qa_model(str(source), keep_layers=[0, 2], ffn_width=WIDTH)
    key = ffn_names(student.config.model_type)[2]
    checkpoint = {
        "hyper_parameters": {
            "name_or_path": str(source),
            "config_overrides": None,
            "keep_layers": [0, 2],
            "ffn_width": WIDTH,
        },
        "datamodule_hyper_parameters": {"tokenizer_name_or_path": minilm_path()},
        "state_dict": {f"model.{k}": v for k, v in student.state_dict().items()},
    }
    if embedded:
        checkpoint[CHECKPOINT_KEY] = model_files(student.config, None)
    overrides = checkpoint_model_config(checkpoint, "x.ckpt")["config_overrides"]
    assert overrides == {"num_hidden_layers": 2, key: WIDTH}
    torch.save(checkpoint, tmp_path / "student.ckpt")
    rebuilt = load_checkpoint(tmp_path / "student.ckpt").model
    assert getattr(rebuilt.config, key) == WIDTH
    assert logits(rebuilt) == logits(student)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn_width", [0, -3, 1.5, True, "768", [12]])
def test_invalid_widths_are_clear_errors(ffn_width) -> None:
    with pytest.raises(ConfigError, match="model.ffn_width") as error:
        check_ffn_width(ffn_width, intermediate_size=32)
    assert "a positive integer" in str(error.value)


def test_a_width_above_the_models_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"model.ffn_width=33; .* have 32 neurons"):
        check_ffn_width(33, intermediate_size=32)
    check_ffn_width(32, intermediate_size=32)
    check_ffn_width(None, intermediate_size=32)


def test_config_check_knows_the_models_width(compose_train) -> None:
    """model=tiny has 64 feed-forward neurons, read from its config before any weights."""
    with pytest.raises(ConfigError, match=r"model.ffn_width=65; .* have 64 neurons"):
        validate_train_config(compose_train(["model=tiny", "data=demo", "model.ffn_width=65"]))
    validate_train_config(compose_train(["model=tiny", "data=demo", "model.ffn_width=64"]))


def test_an_encoder_without_a_supported_feed_forward_block_is_a_clear_error() -> None:
    albert = AutoModelForQuestionAnswering.from_config(
        AlbertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, **SIZES)
    )
    with pytest.raises(ConfigError, match="model.ffn_width is not supported for Albert"):
        prune_ffn(albert, 8)


def test_cli_bad_width_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        "model.ffn_width=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    cli_error(result, "model.ffn_width=0", "a positive integer")


# -- the CLI end to end ---------------------------------------------------------------------------


@pytest.mark.slow  # two trainings' worth of work on the tiny model: about a minute on 2 cores
def test_distil_into_a_narrowed_student_then_evaluate_and_export_its_checkpoint(
    compose_train, model_dir, tmp_path: Path
) -> None:
    """The tiny model (64 neurons) narrowed to 24 neurons and layer 1, distilled from itself:
    its hf_model/ says intermediate_size 24, its checkpoint evaluates to the scores training
    logged and exports to ONNX (the architecture rebuilt from the checkpoint)."""
    run = tmp_path / "student"
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        f"model.name_or_path={model_dir}",
        "model.from_scratch=false",
        "model.config_overrides=null",
        "model.keep_layers=[1]",
        "model.ffn_width=24",
        "distill=default",
        f"distill.teacher={model_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        f"teacher logits of {metrics['train_windows']} windows computed"
        in (run / "train.log").read_text()
    )
    config = AutoConfig.from_pretrained(run / "hf_model")
    assert (config.intermediate_size, config.num_hidden_layers) == (24, 1)

    cfg = compose_train([*EVAL_OVERRIDES, f"ckpt_path={metrics['best_checkpoint']}"], "eval")
    cfg.paths.output_dir = str(tmp_path / "eval")
    assert evaluate(cfg)["f1"] == pytest.approx(metrics["best"]["f1"], abs=1e-4)

    pytest.importorskip("onnxruntime")
    onnx_dir = tmp_path / "onnx"
    cfg = compose_train(
        [f"ckpt_path={metrics['best_checkpoint']}", "format=onnx", f"out_dir={onnx_dir}"],
        config_name="export",
    )
    written = export(cfg)
    assert written["max_abs_diff"] < 1e-4
    assert json.loads((onnx_dir / "config.json").read_text())["intermediate_size"] == 24
