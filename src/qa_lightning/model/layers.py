"""Students made from a bigger model: keep some of its transformer layers (``model.keep_layers``).

DistilBERT was initialised this way, from every other layer of BERT. The student keeps the
source's embeddings, the chosen layers (renumbered 0..k-1) and its QA head; its config says
``num_hidden_layers`` (DistilBERT: ``n_layers``) = k, so that ``save_pretrained`` writes an
ordinary Hugging Face directory that ``from_pretrained`` loads as a k-layer model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qa_lightning.core.errors import ConfigError
from qa_lightning.core.tokenizer import load_model_config

#: Where encoders keep their list of layers: BERT, MiniLM, RoBERTa, ELECTRA ...; DistilBERT.
LAYER_LISTS = (("encoder", "layer"), ("transformer", "layer"))
KEY = "model.keep_layers"


def check_keep_layers(keep_layers: Sequence[int] | None, num_layers: int | None = None) -> None:
    """``keep_layers`` is ``None`` or a non-empty, increasing list of layer indices, all below
    ``num_layers`` (when given)."""
    if keep_layers is None:
        return
    example = f"e.g. {KEY}=[0,2,4] keeps the 1st, 3rd and 5th layers"
    if isinstance(keep_layers, str | bytes) or not isinstance(keep_layers, Sequence):
        raise ConfigError(
            f"invalid config: {KEY}={keep_layers!r}; give a list of layer indices ({example})."
        )
    values = list(keep_layers)
    if not values:
        raise ConfigError(
            f"invalid config: {KEY}=[] keeps no layer; give at least one layer index ({example}), "
            "or null to keep all layers."
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(
            f"invalid config: {KEY}={values!r}; the layer indices must be integers ({example})."
        )
    if any(b <= a for a, b in zip(values, values[1:], strict=False)) or values[0] < 0:
        raise ConfigError(
            f"invalid config: {KEY}={values!r}; give layer indices >= 0 in increasing order, "
            f"each once ({example})."
        )
    if num_layers is not None and values[-1] >= num_layers:
        raise ConfigError(
            f"invalid config: {KEY}={values!r}; the model has {num_layers} layers, numbered 0 to "
            f"{num_layers - 1}: keep only those."
        )


def source_num_layers(name_or_path: str, config_overrides: Mapping[str, Any] | None = None) -> int:
    """The number of transformer layers of ``name_or_path``'s config (with the overrides)."""
    config = load_model_config(name_or_path, config_overrides, f"to check {KEY}")
    return int(config.num_hidden_layers)


def validate_keep_layers(model: Any) -> None:
    """``model.keep_layers`` of a model config: its form, then its range against the config of
    ``model.name_or_path`` (a small file: no weights are loaded)."""
    keep_layers = model.get("keep_layers")
    check_keep_layers(keep_layers)
    if keep_layers is not None:
        overrides = model.get("config_overrides")
        check_keep_layers(keep_layers, source_num_layers(str(model.name_or_path), overrides))


def encoder_layers(model: torch.nn.Module, key: str = KEY) -> tuple[torch.nn.Module, str]:
    """The module holding the encoder's ``ModuleList`` of layers, and that list's attribute name
    (else a :class:`ConfigError` naming ``key``, the setting that needs them)."""
    base = model.base_model
    for parent_name, list_name in LAYER_LISTS:
        parent = getattr(base, parent_name, None)
        if isinstance(getattr(parent, list_name, None), torch.nn.ModuleList):
            return parent, list_name
    raise ConfigError(
        f"{key} is not supported for {type(model).__name__}: it needs an encoder whose layers "
        "are in encoder.layer (BERT, MiniLM, RoBERTa, ELECTRA) or transformer.layer "
        f"(DistilBERT). Set {key}=null."
    )


def select_layers(model: torch.nn.Module, keep_layers: Sequence[int]) -> torch.nn.Module:
    """``model`` with only the layers ``keep_layers`` (the same module objects, renumbered
    0..k-1) and its config's layer count set to k. Returns ``model``, changed in place."""
    parent, list_name = encoder_layers(model)
    layers = getattr(parent, list_name)
    keep_layers = list(keep_layers)
    check_keep_layers(keep_layers, len(layers))
    kept = torch.nn.ModuleList(layers[i] for i in keep_layers)
    for index, layer in enumerate(kept):
        for module in layer.modules():  # attention keeps its layer index (for caches)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    setattr(parent, list_name, kept)
    model.config.num_hidden_layers = len(kept)  # DistilBERT's config maps it to n_layers
    return model
