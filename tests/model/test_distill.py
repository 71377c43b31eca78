"""Distillation: the loss on hand-computed logits, the module's loss (alpha = 0 is plain
fine-tuning), the teacher run once per window and cached, config errors before any work, and
the CLI end to end (teacher -> student -> export -> predict, evaluate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoConfig, AutoModelForQuestionAnswering, BertTokenizerFast

from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.collate import TEACHER_LOGITS, WindowCollator
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import make_train_windows
from qa_lightning.evaluate import evaluate
from qa_lightning.model.distillation import distillation_loss, mixed_loss, soft_kl
from qa_lightning.model.logits import TorchLogits
from qa_lightning.runs import teacher
from qa_lightning.runs.teacher import (
    add_teacher_logits,
    compute_teacher_logits,
    teacher_fingerprint,
)
from qa_lightning.train import train
from tests.conftest import SHORT_WINDOWS, TINY_OVERRIDES, run_cli

LN3 = math.log(3)
#: KL([.9, .1] || [.5, .5]): teacher logits [2 ln 3, 0] at T = 1 against a uniform student
KL_T1 = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
#: KL([.75, .25] || [.5, .5]): the same logits softened by T = 2 to [ln 3, 0]
KL_T2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
TINY_SIZES = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer) -> Path:
    """An exported directory of a random tiny model with MiniLM's tokenizer (as model=tiny)."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(minilm_path(), **TINY_SIZES, intermediate_size=64)
    directory = tmp_path_factory.mktemp("teacher") / "hf_model"
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def windows(tokenizer) -> datasets.Dataset:
    """Training windows of 6 demo questions, of several lengths (short windows)."""
    examples = load_local_file(resource_path("demo/train.json")).select(range(6))
    return datasets.Dataset.from_dict(
        make_train_windows(
            tokenizer,
            examples["question"][:],
            examples["context"][:],
            examples["answers"][:],
            SHORT_WINDOWS["max_length"],
            SHORT_WINDOWS["stride"],
        )
    )


# -- the loss on hand-computed logits -------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, KL_T1), (2.0, KL_T2)])
def test_kl_of_the_softened_distributions(temperature: float, expected: float) -> None:
    student, teacher = torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.long)
    assert soft_kl(student, teacher, mask, temperature).item() == pytest.approx(expected)


def test_distillation_loss_is_t_squared_times_the_mean_of_start_and_end() -> None:
    mask = torch.ones(1, 2, dtype=torch.long)
    uniform, teacher = torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]])
    both = distillation_loss(uniform, uniform, teacher, teacher, mask, 2.0)
    assert both.item() == pytest.approx(4 * KL_T2)
    start_only = distillation_loss(uniform, uniform, teacher, uniform, mask, 2.0)
    assert start_only.item() == pytest.approx(4 * KL_T2 / 2)
    assert distillation_loss(teacher, teacher, teacher, teacher, mask, 2.0).item() == 0


def test_padding_positions_are_in_neither_distribution() -> None:
    """Window 0 has 2 real tokens and 2 padding positions holding large logits; window 1 has 4
    real tokens on which student and teacher agree. The loss is the mean of the two windows'
    KL over real tokens only, and no gradient reaches the padding."""
    student = torch.tensor([[0.0, 0.0, 50.0, -30.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[2 * LN3, 0.0, -20.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    loss = soft_kl(student, teacher, mask, 1.0)
    assert loss.item() == pytest.approx((KL_T1 + 0) / 2)
    loss.backward()
    # d KL / d s = (p_student - p_teacher) / T, averaged over the 2 windows
    expected = torch.tensor([[(0.5 - 0.9) / 2, (0.5 - 0.1) / 2, 0.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(student.grad, expected)


def test_mixed_loss_weights_the_soft_targets_by_alpha() -> None:
    label, soft = torch.tensor(3.0), torch.tensor(1.0)
    assert [mixed_loss(label, soft, a).item() for a in (0.0, 0.25, 1.0)] == [3.0, 2.5, 1.0]


# -- the module's loss ----------------------------------------------------------------------------


#: training_loss logs its parts; outside a Trainer, Lightning warns that it cannot
NO_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def tiny_modules(compose_train, *settings: dict | None) -> list:
    """QAModules of model=tiny with the same weights, one per ``distill`` setting."""
    model_cfg = compose_train(["model=tiny"]).model
    torch.manual_seed(0)
    modules = [instantiate(model_cfg, distill=setting) for setting in settings]
    for module in modules[1:]:
        module.load_state_dict(modules[0].state_dict())
    return modules


def batch_with_teacher_logits(windows: datasets.Dataset, tokenizer) -> dict[str, torch.Tensor]:
    """5 windows of different lengths (so padded) with random teacher logits."""
    first_of_length = {n: i for i, n in reversed(list(enumerate(windows["length"])))}
    chosen = sorted(first_of_length.values())[:5]
    generator = torch.Generator().manual_seed(3)
    rows = []
    for window in windows.select(chosen).remove_columns(["length", "example_index"]):
        n = len(window["input_ids"])
        teacher = {
            key: (torch.randn(n, generator=generator) * 3).tolist() for key in TEACHER_LOGITS
        }
        rows.append({**window, **teacher})
    batch = WindowCollator(tokenizer.pad_token_id)(rows)
    assert (batch["attention_mask"] == 0).any()  # padding is present
    return batch


def loss_and_grads(module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both modules
    loss = module.training_loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


@NO_TRAINER
def test_alpha_zero_is_plain_fine_tuning(compose_train, windows, tokenizer) -> None:
    plain, distilled = tiny_modules(compose_train, None, {"temperature": 2.0, "alpha": 0.0})
    batch = batch_with_teacher_logits(windows, tokenizer)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    loss, grads = loss_and_grads(distilled, batch)
    assert plain_loss.item() > 0
    assert torch.equal(loss, plain_loss)
    for a, b in zip(grads, plain_grads, strict=True):
        assert torch.equal(a, b)


@NO_TRAINER
def test_alpha_one_is_the_soft_targets_only(compose_train, windows, tokenizer) -> None:
    (module,) = tiny_modules(compose_train, {"temperature": 2.0, "alpha": 1.0})
    module.eval()  # no dropout: one forward pass gives the logits the loss saw
    batch = batch_with_teacher_logits(windows, tokenizer)
    with torch.no_grad():
        loss = module.training_loss(batch)
        outputs = module(batch)
        relabelled = module.training_loss({**batch, "end_positions": batch["start_positions"]})
    expected = distillation_loss(
        outputs.start_logits,
        outputs.end_logits,
        batch["teacher_start_logits"],
        batch["teacher_end_logits"],
        batch["attention_mask"],
        2.0,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0
    assert relabelled.item() == loss.item()  # the labels play no part


@NO_TRAINER
def test_a_distilling_module_without_teacher_logits_says_how_to_get_them(
    compose_train, windows, tokenizer
) -> None:
    (module,) = tiny_modules(compose_train, {"temperature": 2.0, "alpha": 0.5})
    batch = batch_with_teacher_logits(windows, tokenizer)
    for key in TEACHER_LOGITS:
        del batch[key]
    with pytest.raises(ConfigError, match="distill.teacher=PATH"):
        module.training_loss(batch)


# -- the teacher's logits, once -------------------------------------------------------------------


def test_stored_logits_are_the_teachers_eval_logits_of_each_unpadded_window(
    tiny_teacher, windows, tokenizer
) -> None:
    stored = add_teacher_logits(
        windows, tiny_teacher, tokenizer.pad_token_id, None, "cpu", "32-true", batch_size=4
    )
    assert stored.column_names == [*windows.column_names, *TEACHER_LOGITS]
    teacher = AutoModelForQuestionAnswering.from_pretrained(tiny_teacher).eval()
    for i in (0, len(windows) // 2, len(windows) - 1):
        window = stored[i]
        with torch.no_grad():
            outputs = teacher(
                **{k: torch.tensor([window[k]]) for k in ("input_ids", "attention_mask")},
                token_type_ids=torch.tensor([window["token_type_ids"]]),
            )
        assert len(window["teacher_start_logits"]) == len(window["input_ids"])
        torch.testing.assert_close(
            torch.tensor(window["teacher_start_logits"]), outputs.start_logits[0]
        )
        torch.testing.assert_close(
            torch.tensor(window["teacher_end_logits"]), outputs.end_logits[0]
        )


def test_padded_teacher_batches_give_the_unpadded_logits(tiny_teacher, windows, tokenizer) -> None:
    assert len(set(windows["length"])) > 1
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_teacher)
    logits_fn = TorchLogits(model, "cpu", "32-true")
    pad = tokenizer.pad_token_id
    unpadded = compute_teacher_logits(logits_fn, windows, pad, batch_size=8, equal_length=True)
    padded = compute_teacher_logits(logits_fn, windows, pad, batch_size=8, equal_length=False)
    for key in TEACHER_LOGITS:
        for a, b in zip(padded[key], unpadded[key], strict=True):
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=0)


def test_the_cache_key_follows_the_teachers_weights(tiny_teacher, tmp_path: Path) -> None:
    copy = tmp_path / "teacher"
    copy.mkdir()
    for file in tiny_teacher.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert teacher_fingerprint(copy) == teacher_fingerprint(tiny_teacher)
    model = AutoModelForQuestionAnswering.from_pretrained(copy)
    with torch.no_grad():
        model.qa_outputs.bias += 1
    model.save_pretrained(copy)
    assert teacher_fingerprint(copy) != teacher_fingerprint(tiny_teacher)


class CountingLogits(TorchLogits):
    """TorchLogits that counts the windows it runs the teacher on."""

    windows = 0

    def __call__(self, batch):
        CountingLogits.windows += len(batch["input_ids"])
        return super().__call__(batch)


def test_the_teacher_runs_once_per_window_over_two_epochs_and_runs(
    compose_train, tiny_teacher, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(teacher, "TorchLogits", CountingLogits)
    monkeypatch.setattr(CountingLogits, "windows", 0)
    overrides = [
        *TINY_OVERRIDES,
        "trainer.max_epochs=2",
        "distill=default",
        f"distill.teacher={tiny_teacher}",
    ]
    metrics = train(compose_train(overrides))
    assert metrics["epochs"] == 2
    assert CountingLogits.windows == metrics["train_windows"] > 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "loss_distill", "loss_label"):
        assert {f"train/{name}_step", f"train/{name}_epoch"} <= tags
    distilled, label, total = (
        events.Scalars(f"train/{name}_epoch")[-1].value
        for name in ("loss_distill", "loss_label", "loss")
    )
    assert total == pytest.approx(0.5 * distilled + 0.5 * label, rel=1e-4)
    # a second student on the same windows and teacher reads the cached logits
    again = compose_train([*overrides, "trainer.max_epochs=1", "seed=7"])
    again.paths.output_dir = str(tmp_path / "again")
    train(again)
    assert CountingLogits.windows == metrics["train_windows"]


# -- config errors, before any work ---------------------------------------------------------------


@pytest.fixture
def other_tokenizer_teacher(tmp_path: Path) -> Path:
    """A model directory whose tokenizer has another vocabulary than MiniLM's."""
    directory = tmp_path / "other"
    directory.mkdir()
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    AutoConfig.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.temperature=0", "distill.temperature=0; must be a number > 0"),
        ("distill.alpha=1.5", "distill.alpha=1.5; must be in [0, 1]"),
        ("distill.batch_size=0", "distill.batch_size=0; must be an integer > 0"),
        ("distill.precision=fp8", "distill.precision='fp8'; use auto, 32-true"),
        ("distill.teacher=no/such/dir", "distill.teacher='no/such/dir' does not exist"),
        ("distill.teacher=null", "distill.teacher is not set"),
    ],
)
def test_invalid_distill_settings_stop_before_any_work(
    compose_train, tiny_teacher, tmp_path: Path, override: str, message: str
) -> None:
    cfg = compose_train(
        [*TINY_OVERRIDES, "distill=default", f"distill.teacher={tiny_teacher}", override]
    )
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert message in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_an_unset_teacher_is_a_missing_value(compose_train) -> None:
    with pytest.raises(ConfigError, match=r"missing required config value\(s\) \['distill.teacher"):
        train(compose_train([*TINY_OVERRIDES, "distill=default"]))


def test_a_teacher_with_another_tokenizer_stops_before_any_work(
    compose_train, other_tokenizer_teacher, tmp_path: Path
) -> None:
    cfg = compose_train(
        [*TINY_OVERRIDES, "distill=default", f"distill.teacher={other_tokenizer_teacher}"]
    )
    with pytest.raises(ConfigError, match="has another tokenizer .* than the student"):
        train(cfg)
    assert not (tmp_path / "cache").exists()


# -- the CLI end to end ---------------------------------------------------------------------------

QUESTION = "Who wrote the report?"
CONTEXT = "The report was written by the committee in 1998 after a long inquiry."


def test_distil_a_tiny_teacher_into_a_student_of_its_layers(compose_train, tmp_path: Path) -> None:
    """train a teacher; distil it (from its checkpoint) into a 1-layer student made from its own
    layer 1; the student's export is a 1-layer HF directory that predict answers with, and its
    checkpoint evaluates to the scores training logged."""
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    teacher_run, student_run = tmp_path / "teacher", tmp_path / "student"
    result = run_cli("qa_lightning.train", *TINY_OVERRIDES, cache, f"hydra.run.dir={teacher_run}")
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = json.loads((teacher_run / "metrics.json").read_text())

    student_overrides = [
        *TINY_OVERRIDES,
        f"model.name_or_path={teacher_run / 'hf_model'}",
        "model.from_scratch=false",
        "model.config_overrides=null",
        "model.keep_layers=[1]",
        "distill=default",
        f"distill.teacher={teacher['best_checkpoint']}",
    ]
    result = run_cli(
        "qa_lightning.train", *student_overrides, cache, f"hydra.run.dir={student_run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    student = json.loads((student_run / "metrics.json").read_text())
    log = (student_run / "train.log").read_text()
    assert f"teacher logits of {student['train_windows']} windows computed" in log
    assert AutoConfig.from_pretrained(student_run / "hf_model").num_hidden_layers == 1

    result = run_cli(
        "qa_lightning.predict",
        f"model_dir={student_run / 'hf_model'}",
        f"question='{QUESTION}'",
        f"context='{CONTEXT}'",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = next(line for line in result.stdout.splitlines() if ". {" in line)
    answer = json.loads(printed.split(". ", 1)[1])
    assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]

    # the checkpoint rebuilds the 1-layer student (no model.keep_layers given to evaluate)
    eval_overrides = [o for o in TINY_OVERRIDES if o.startswith(("data", "trainer"))]
    cfg = compose_train([*eval_overrides, f"ckpt_path={student['best_checkpoint']}"], "eval")
    cfg.paths.output_dir = str(tmp_path / "eval")
    assert evaluate(cfg)["f1"] == pytest.approx(student["best"]["f1"], abs=1e-4)
