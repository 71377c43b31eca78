"""Collate windows into padded tensors (dynamic padding to a multiple of 8)."""

from __future__ import annotations

from typing import Any

import torch

from qa_lightning.data.windowing import NO_OFFSET

#: The tokenizer outputs a model takes (``token_type_ids`` only where the tokenizer makes them).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: A distillation teacher's per-token logits (float, one per token of the window; see
#: :mod:`qa_lightning.runs.teacher`): padded with 0, which the loss masks with ``attention_mask``.
TEACHER_LOGITS = ("teacher_start_logits", "teacher_end_logits")


class WindowCollator:
    """Pads a list of windows to the longest one (rounded up to ``pad_to_multiple_of``).

    Model inputs are padded with the tokenizer's pad id (0 for masks and token types), offsets
    with ``NO_OFFSET``, a teacher's logits (float32) with 0; labels and indices are stacked.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, windows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(w["input_ids"]) for w in windows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in windows[0]:
            values = [w[key] for w in windows]
            if key in MODEL_INPUTS:
                pad = self.pad_token_id if key == "input_ids" else 0
                batch[key] = _pad([torch.as_tensor(v) for v in values], length, pad)
            elif key == "offset_mapping":
                batch[key] = _pad(
                    [torch.as_tensor(v).view(-1, 2) for v in values], length, NO_OFFSET
                )
            elif key in TEACHER_LOGITS:
                rows = [torch.as_tensor(v, dtype=torch.float32) for v in values]
                batch[key] = _pad(rows, length, 0, torch.float32)
            else:
                batch[key] = torch.as_tensor(values)
        return batch


def _pad(
    rows: list[torch.Tensor], length: int, value: int, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    shape = (len(rows), length, *rows[0].shape[1:])
    out = torch.full(shape, value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
