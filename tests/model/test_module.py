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
