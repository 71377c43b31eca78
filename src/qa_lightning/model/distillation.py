"""Task distillation's loss: a fine-tuned teacher's start/end distributions as soft targets.

The student's loss per batch is ``alpha * T^2 * mean(KL_start, KL_end) + (1 - alpha) * CE``:
``KL`` between the teacher's and the student's start (end) distributions softened by the
temperature ``T``, over each window's real tokens only (padding positions, ``attention_mask ==
0``, are in neither distribution), and ``CE`` the model's usual cross-entropy on the labels. The
``T^2`` keeps the soft targets' gradients on the scale of the labels' as ``T`` changes (Hinton et
al.), as in the DistilBERT recipe. The teacher's logits come with the batch
(:mod:`qa_lightning.runs.teacher`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qa_lightning.core.errors import ConfigError
from qa_lightning.data.collate import TEACHER_LOGITS

# -- the loss ----------------------------------------------------------------------------------


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``KL(teacher || student)`` of the distributions ``softmax(logits / temperature)`` over each
    window's real tokens (``attention_mask == 1``), summed over tokens, averaged over windows.

    All inputs are ``(windows, tokens)``; the logits are computed in float32.
    """
    mask = attention_mask.bool()
    student = (student_logits.float() / temperature).masked_fill(~mask, -math.inf)
    teacher = (teacher_logits.float() / temperature).masked_fill(~mask, -math.inf)
    student_log_p = F.log_softmax(student, dim=-1)
    teacher_log_p = F.log_softmax(teacher, dim=-1)
    # padding: p = 0 and log p = -inf, so log p_t - log p_s = nan there; it counts 0 (and its
    # gradient too: where() passes none to the branch it does not take)
    log_ratio = torch.where(mask, teacher_log_p - student_log_p, torch.zeros_like(student))
    return (teacher_log_p.exp() * log_ratio).sum(dim=-1).mean()


def distillation_loss(
    student_start: torch.Tensor,
    student_end: torch.Tensor,
    teacher_start: torch.Tensor,
    teacher_end: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2 * mean(KL_start, KL_end)`` (see :func:`soft_kl`)."""
    start = soft_kl(student_start, teacher_start, attention_mask, temperature)
    end = soft_kl(student_end, teacher_end, attention_mask, temperature)
    return temperature**2 * (start + end) / 2


def mixed_loss(label_loss: torch.Tensor, distill_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * distill_loss + (1 - alpha) * label_loss``: with ``alpha = 0`` the same value and
    gradients as training without a teacher, with ``alpha = 1`` the soft targets only."""
    return alpha * distill_loss + (1 - alpha) * label_loss


def batch_distillation_loss(
    outputs: Any, batch: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """:func:`distillation_loss` of a model's ``outputs`` on a collated ``batch`` that holds the
    teacher's logits."""
    missing = [key for key in TEACHER_LOGITS if key not in batch]
    if missing:
        raise ConfigError(
            f"the model is configured to distil (model.distill) but its training batches hold no "
            f"teacher logits ({missing}); train with python -m qa_lightning.train distill=default "
            "distill.teacher=PATH, which computes them."
        )
    return distillation_loss(
        outputs.start_logits,
        outputs.end_logits,
        batch["teacher_start_logits"],
        batch["teacher_end_logits"],
        batch["attention_mask"],
        temperature,
    )
