"""Plain Python values from configs: what checkpoints hold and transformers takes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from omegaconf import OmegaConf


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers, paths and NumPy scalars turned into plain Python
    values (dict, list, str, int, float ...), which ``torch.load(weights_only=True)`` reads and
    ``from_pretrained`` takes as keyword arguments."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
