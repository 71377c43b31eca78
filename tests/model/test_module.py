"""QAModule's optimizer: fused AdamW where a fused kernel exists, no decay on biases and norms."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from qa_lightning.model import QAModule, load_qa_model


@pytest.fixture
def configured(compose_train):
    """The tiny model's QAModule (``conf/model/tiny.yaml``) on a CPU trainer, and its AdamW."""

    def _configured(fused_optimizer: bool | None) -> tuple[QAModule, torch.optim.Optimizer]:
        model_cfg = compose_train(["model=tiny"]).model
        module = instantiate(model_cfg, fused_optimizer=fused_optimizer)
        module.trainer = L.Trainer(
            accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False
        )
        return module, module.configure_optimizers()["optimizer"]

    return _configured


@pytest.mark.parametrize(("setting", "fused"), [(None, True), (True, True), (False, False)])
def test_adamw_is_fused_on_cpu_unless_switched_off(
    configured, setting: bool | None, fused: bool
) -> None:
    _, optimizer = configured(setting)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert bool(optimizer.defaults["fused"]) is fused


def test_no_weight_decay_on_biases_and_layer_norms(configured) -> None:
    module, optimizer = configured(None)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(
        n.endswith("bias") or "LayerNorm" in n for n in map(names.get, map(id, no_decay["params"]))
    )
    assert not any(n.endswith("bias") for n in map(names.get, map(id, decay["params"])))
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_fused_step_matches_the_unfused_update(configured) -> None:
    """One fused step gives the same weights as the per-tensor AdamW step, to rounding."""
    torch.manual_seed(0)
    fused_module, fused = configured(None)
    plain_module, plain = configured(False)
    plain_module.model.load_state_dict(fused_module.model.state_dict())
    before = [p.detach().clone() for p in fused_module.parameters()]
    for a, b in zip(fused_module.parameters(), plain_module.parameters(), strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    fused.step()
    plain.step()
    for a, b, old in zip(fused_module.parameters(), plain_module.parameters(), before, strict=True):
        assert not torch.equal(a, old)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_half_precision_checkpoint_loads_as_fp32_master_weights(configured, tmp_path) -> None:
    """A fp16 checkpoint (transformers 5 keeps its dtype) loads as fp32 weights, same values."""
    module, _ = configured(None)
    module.model.half().save_pretrained(tmp_path)
    loaded = load_qa_model(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for a, b in zip(loaded.parameters(), module.model.parameters(), strict=True):
        assert torch.equal(a, b.float())


def _fit_steps(module: QAModule, precision: str, clip: float | None) -> list[torch.Tensor]:
    """Three training steps of ``module`` on fixed random windows; its weights after them."""
    generator = torch.Generator().manual_seed(0)
    windows = [
        {
            "input_ids": torch.randint(5, 1000, (16,), generator=generator),
            "attention_mask": torch.ones(16, dtype=torch.long),
            "token_type_ids": torch.zeros(16, dtype=torch.long),
            "start_positions": torch.tensor(3),
            "end_positions": torch.tensor(5),
        }
        for _ in range(12)
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)  # the same dropout masks in every run
    trainer.fit(module, torch.utils.data.DataLoader(windows, batch_size=4))
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_clips_gradients_as_lightning_does(compose_train, precision: str) -> None:
    """Clipping with fused AdamW (which Lightning refuses under mixed precision) gives the
    weights of Lightning's own clipping with per-tensor AdamW; without clipping they differ."""
    model_cfg = compose_train(["model=tiny"]).model
    torch.manual_seed(0)
    fused = instantiate(model_cfg, fused_optimizer=True)
    state = {k: v.clone() for k, v in fused.state_dict().items()}

    def module(fused_optimizer: bool) -> QAModule:
        built = instantiate(model_cfg, fused_optimizer=fused_optimizer)
        built.load_state_dict(state)
        return built

    clipped = _fit_steps(fused, precision, clip=1e-3)
    reference = _fit_steps(module(False), precision, clip=1e-3)
    unclipped = _fit_steps(module(True), precision, clip=None)
    for a, b in zip(clipped, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(clipped, unclipped, strict=True))
