"""fp32 CPU inference with linear layers packed for oneDNN: the same logits as the plain model
(padded batches with an attention mask included), every ``nn.Linear`` replaced, and the packing
applied where ``TorchLogits`` runs fp32 on a CPU only."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForQuestionAnswering, BertConfig, DistilBertConfig

from qa_lightning.model.logits import TorchLogits
from qa_lightning.model.packed import (
    PackedLinear,
    onednn_linear_available,
    pack_linear_layers,
    padded_rows,
    release_pages,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="torch without oneDNN")

CONFIGS = {
    "bert": lambda: BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    ),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
    ),
}  # fmt: skip


def batch() -> dict[str, torch.Tensor]:
    """Two windows, the second padded after 7 of its 12 tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def random_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForQuestionAnswering.from_config(CONFIGS[kind]()).eval()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_model_gives_the_plain_models_logits(kind: str) -> None:
    plain, packed = random_model(kind), random_model(kind)
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    # per layer: query, key, value, attention output, FFN in and out; and the QA head
    assert linears == 2 * 6 + 1
    assert pack_linear_layers(packed) == linears
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == linears
    with torch.inference_mode():
        expected, found = plain(**batch()), packed(**batch())
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(found[name], expected[name], atol=1e-5, rtol=1e-5)
    assert pack_linear_layers(packed) == 0  # nothing left to pack


def test_a_model_loaded_from_safetensors_packs_to_the_same_logits(tmp_path) -> None:
    """Its weights are views of one memory map of the file: the replaced ones' pages are
    released, the embeddings and biases that stay in the map still hold their values."""
    random_model("bert").save_pretrained(tmp_path)
    plain = AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    packed = AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    pack_linear_layers(packed)
    with torch.inference_mode():
        expected, found = plain(**batch()), packed(**batch())
    torch.testing.assert_close(found.start_logits, expected.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.end_logits, expected.end_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux only")
def test_release_pages_gives_back_whole_pages_nobody_keeps() -> None:
    page = mmap.PAGESIZE
    floats = page // 4
    memory = torch.ones(8 * floats + 64)  # a storage that stays, as a memory map does
    offset = (-memory.data_ptr() % page) // 4  # the first element on a page boundary
    dropped = memory[offset + floats // 2 : offset + 5 * floats]  # pages 1-4 whole, half of 0
    kept_on_page_3 = memory[offset + 3 * floats + 7 : offset + 3 * floats + 8]
    overlapping = memory[offset + 2 * floats : offset + 4 * floats]  # pages 2 and 3
    assert release_pages([dropped], [memory[: offset + floats // 2]]) == 4 * page
    # anonymous memory reads as zeros once released: exactly the four whole pages
    assert memory[offset + floats // 2 : offset + floats].eq(1).all()  # page 0: partly dropped
    assert memory[offset + floats : offset + 5 * floats].eq(0).all()
    assert memory[offset + 5 * floats :].eq(1).all() and memory[:offset].eq(1).all()
    memory.fill_(1)
    assert release_pages([overlapping], [kept_on_page_3]) == 0  # a kept element: nothing
    assert memory.eq(1).all()
    assert release_pages([memory[offset : offset + floats - 1]], []) == 0  # no whole page


def test_a_linear_layer_without_bias() -> None:
    linear = nn.Linear(8, 3, bias=False)
    inputs = torch.randn(2, 5, 8)
    packed = PackedLinear(linear)
    assert packed.bias is None and packed.out_features == 3
    with torch.inference_mode():
        torch.testing.assert_close(packed(inputs), linear(inputs), atol=1e-6, rtol=1e-5)


def test_torch_logits_packs_fp32_on_a_cpu_only_when_asked() -> None:
    fp32 = TorchLogits(random_model("bert"), "cpu", "32-true", pack=True)
    assert any(isinstance(m, PackedLinear) for m in fp32.model.modules())
    bf16 = TorchLogits(random_model("bert"), "cpu", "bf16-mixed", pack=True)
    assert not any(isinstance(m, PackedLinear) for m in bf16.model.modules())
    # a model others use too (an export's, a teacher's) stays as it is
    shared = TorchLogits(random_model("bert"), "cpu", "32-true")
    assert not any(isinstance(m, PackedLinear) for m in shared.model.modules())
    with pytest.raises(ValueError, match="packed for fp32 on a CPU: load it again for bf16-mixed"):
        TorchLogits(fp32.model, "cpu", "bf16-mixed")
    start, end = fp32(batch())
    plain = random_model("bert")
    with torch.inference_mode():
        expected = plain(**batch())
    torch.testing.assert_close(start, expected.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, expected.end_logits, atol=1e-5, rtol=1e-5)


def test_rows_are_padded_to_a_few_shapes_per_doubling() -> None:
    # at least 16; from 128 on, steps of a quarter of the power of two below
    cases = {1: 16, 16: 16, 17: 32, 100: 112, 128: 128, 129: 160, 180: 192, 385: 448, 1000: 1024}
    assert {rows: padded_rows(rows) for rows in cases} == cases
    shapes = {padded_rows(rows) for rows in range(1, 12_289)}
    assert len(shapes) <= 4 * 14  # about four per doubling up to 32 windows of 384 tokens
    assert all(rows <= padded_rows(rows) <= max(rows + 15, 1.25 * rows) for rows in range(1, 5000))
