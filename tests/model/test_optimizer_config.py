"""Optimizer and schedule from config (conf/model/optimizer/, conf/model/scheduler/): the defaults
step exactly as the AdamW + linear schedule that QAModule built by hand; other choices by config."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from transformers import get_scheduler

from qa_lightning.core.errors import ConfigError
from qa_lightning.model.config import validate_model_config
from qa_lightning.model.module import NO_DECAY, QAModule

STEPS = 8  # the trainer's max_steps: the schedule's num_training_steps


def configured(compose_train, *overrides: str) -> tuple[QAModule, dict]:
    """The tiny model's QAModule, seeded, on a CPU trainer of STEPS steps, and its optimizers."""
    torch.manual_seed(0)
    module = instantiate(compose_train(["model=tiny", *overrides]).model)
    module.trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False
    )
    return module, module.configure_optimizers()


def hand_built(model: torch.nn.Module, lr: float, warmup_ratio: float):
    """AdamW and schedule as QAModule.configure_optimizers built them before they were config."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if any(n in name for n in NO_DECAY) else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        eps=1e-8,
        fused=True,
    )
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(warmup_ratio * STEPS),
        num_training_steps=STEPS,
    )
    return optimizer, scheduler


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    input_ids = torch.randint(1000, 2000, (4, 24), generator=generator)
    positions = torch.randint(1, 24, (2, 4), generator=generator).sort(dim=0).values
    return model(input_ids=input_ids, start_positions=positions[0], end_positions=positions[1]).loss


def test_default_config_steps_exactly_as_the_hand_built_adamw_and_schedule(compose_train) -> None:
    module, configured_optimizers = configured(compose_train, "model.warmup_ratio=0.25")
    optimizer = configured_optimizers["optimizer"]
    scheduler = configured_optimizers["lr_scheduler"]["scheduler"]
    assert configured_optimizers["lr_scheduler"]["interval"] == "step"
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["lr"], optimizer.defaults["eps"]) == (1e-3, 1e-8)  # tiny: lr 1e-3
    assert optimizer.defaults["fused"] is True

    reference = copy.deepcopy(module.model)
    ref_optimizer, ref_scheduler = hand_built(reference, lr=1e-3, warmup_ratio=0.25)
    initial = [p.detach().clone() for p in module.model.parameters()]
    module.model.eval(), reference.eval()  # no dropout: both see the same gradients
    lrs = []
    for step in range(5):
        for model, opt, sched in ((module.model, optimizer, scheduler),
                                  (reference, ref_optimizer, ref_scheduler)):  # fmt: skip
            loss_of(model, step).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        lrs.append([group["lr"] for group in optimizer.param_groups])
        assert lrs[-1] == [group["lr"] for group in ref_optimizer.param_groups]
        for ours, theirs in zip(module.model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(ours, theirs)
    # 2 warm-up steps of 8, then linear decay: lr after step k is 1e-3 * min(k/2, (8-k)/6)
    expected = [1e-3 * min(k / 2, (STEPS - k) / 6) for k in range(1, 6)]
    assert [lr[0] for lr in lrs] == pytest.approx(expected)
    assert not torch.equal(next(module.model.parameters()), initial[0])


@pytest.mark.parametrize("override", ["model.scheduler=cosine", "model.scheduler.name=cosine"])
def test_another_transformers_schedule_by_name(compose_train, override: str) -> None:
    module, configured_optimizers = configured(compose_train, override, "model.warmup_ratio=0.25")
    scheduler = configured_optimizers["lr_scheduler"]["scheduler"]
    optimizer = configured_optimizers["optimizer"]
    reference = get_scheduler(
        "cosine",
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
        num_warmup_steps=2,
        num_training_steps=STEPS,
    )
    for _ in range(STEPS):
        optimizer.step(), scheduler.step(), reference.optimizer.step(), reference.step()
        assert scheduler.get_last_lr()[0] == reference.get_last_lr()[0]


def test_no_scheduler_keeps_the_learning_rate(compose_train) -> None:
    _, configured_optimizers = configured(compose_train, "model.scheduler=null")
    assert set(configured_optimizers) == {"optimizer"}
    assert configured_optimizers["optimizer"].param_groups[0]["lr"] == 1e-3


def test_another_optimizer_gets_the_settings_it_takes(compose_train) -> None:
    module, configured_optimizers = configured(
        compose_train,
        "model.optimizer._target_=torch.optim.SGD",
        "+model.optimizer.momentum=0.9",
        "model.lr=0.05",
        "model.fused_optimizer=false",
    )
    optimizer = configured_optimizers["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    assert "eps" not in optimizer.defaults  # AdamW's, not SGD's
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"]) == (0.05, 0.9)
    assert optimizer.defaults["fused"] is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_a_value_set_in_the_optimizer_config_wins(compose_train) -> None:
    _, configured_optimizers = configured(compose_train, "+model.optimizer.eps=1e-6")
    assert configured_optimizers["optimizer"].defaults["eps"] == 1e-6


def test_an_optimizer_that_is_no_config_is_a_config_error(compose_train) -> None:
    cfg = compose_train(["model=tiny", "model.optimizer=null"])
    with pytest.raises(ConfigError, match=r"model.optimizer=None; choose an optimizer config"):
        validate_model_config(cfg.model)
