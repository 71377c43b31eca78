"""fp32 inference on a CPU with the linear layers' weights packed for oneDNN.

PyTorch runs an fp32 ``nn.Linear`` on a CPU through its BLAS (MKL in the PyPI wheels), which on
AMD CPUs takes a slower code path: a 180 x 384 x 1536 product ran at 113 GFLOPS against 261 with
the same weight reordered once into oneDNN's blocked layout (one core of the 2-core AMD EPYC;
a whole MiniLM forward pass 1.9x as fast, logits within 1e-5; see docs/serving.md). This is
what ``torch.compile`` with freezing does to a linear layer on a CPU, without compiling.

A model loaded from safetensors keeps its weights in one memory map of the file, which stays
while any of them (the embeddings) is in use: the pages of the weights replaced by their packed
copies are handed back to the kernel (:func:`release_pages`), or the process would hold the
linear weights twice (about 40 MiB for MiniLM).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from collections.abc import Iterable

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
    replaced = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
                replaced.append(child.weight)
    if replaced:
        kept = [*model.parameters(), *model.buffers()]
        released = release_pages(replaced, kept) >> 20
        log.debug("packed %d linear layers for oneDNN, %d MiB released", len(replaced), released)
    return len(replaced)


def _in_memory(tensor: torch.Tensor) -> bool:
    """A CPU tensor with elements at addresses of its own (not oneDNN's opaque layout)."""
    return tensor.device.type == "cpu" and tensor.layout == torch.strided and tensor.numel() > 0


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[start, end)`` that ``tensor``'s elements occupy."""
    steps = zip(tensor.shape, tensor.stride(), strict=True)
    extent = sum((size - 1) * step for size, step in steps)
    return tensor.data_ptr(), tensor.data_ptr() + (extent + 1) * tensor.element_size()


def release_pages(dropped: Iterable[torch.Tensor], kept: Iterable[torch.Tensor]) -> int:
    """Tell the kernel that the whole memory pages of the ``dropped`` CPU tensors are no longer
    needed (``madvise(MADV_DONTNEED)``, Linux only), except pages that a ``kept`` tensor uses;
    returns the bytes released. For tensors that are views of a storage that stays, such as a
    memory-mapped checkpoint: their pages would otherwise stay in the process. The caller makes
    sure nothing reads the dropped tensors again (a released page of a file map would be read
    from the file again, one of anonymous memory would read as zeros)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    page = mmap.PAGESIZE
    taken = [_span(tensor) for tensor in kept if _in_memory(tensor)]
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for tensor in dropped:
        if not _in_memory(tensor):
            continue
        start, end = _span(tensor)
        start, end = -(-start // page) * page, end // page * page
        if end <= start or any(lo < end and start < hi for lo, hi in taken):
            continue
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released
