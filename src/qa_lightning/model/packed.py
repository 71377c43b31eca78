"""fp32 inference on a CPU with the linear layers' weights packed for oneDNN.

PyTorch runs an fp32 ``nn.Linear`` on a CPU through its BLAS (MKL in the PyPI wheels), which on
AMD CPUs takes a slower code path: a 180 x 384 x 1536 product ran at 113 GFLOPS against 261 with
the same weight reordered once into oneDNN's blocked layout (one core of the 2-core AMD EPYC;
a whole MiniLM forward pass 1.9x as fast, logits within 1e-5; see docs/serving.md). This is
what ``torch.compile`` with freezing does to a linear layer on a CPU, without compiling.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def onednn_linear_available() -> bool:
    """torch was built with oneDNN and has its packed linear operators."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a step of a quarter of the power of two below it (at least 16):
    oneDNN keeps kernels and buffers for every shape it is given, so products of any number of
    rows (tokens) share about four shapes per doubling, for at most 15 or 25% more rows."""
    step = max(16, 1 << max(0, rows.bit_length() - 3))
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """An ``nn.Linear`` for fp32 inference on a CPU: its weight reordered once for oneDNN (the
    original is dropped), the product computed by oneDNN. No gradients."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float(), None)
        self.register_buffer("weight", weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.numel() // self.in_features
        padded = padded_rows(rows)
        flat = inputs.reshape(rows, self.in_features)
        if padded > rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out[:rows].reshape(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (in place; not its subclasses) by a
    :class:`PackedLinear`; returns how many. The model then runs fp32 inference on the CPU only:
    no training, autocast, other devices, ``state_dict`` for saving or ONNX tracing. Nothing is
    changed where torch has no oneDNN."""
    if not onednn_linear_available():
        return 0
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
                count += 1
    if count:
        log.debug("packed %d linear layers for oneDNN", count)
    return count
