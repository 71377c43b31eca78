"""Narrower feed-forward layers: the most important neurons of each layer (``model.ffn_width``).

Every transformer layer's feed-forward block is ``W_out · act(W_in · x + b_in) + b_out``, with
``W_in`` of shape [intermediate, hidden] and ``W_out`` of shape [hidden, intermediate]. Neuron
``i`` of a layer is row ``i`` of ``W_in`` (with ``b_in[i]``) and column ``i`` of ``W_out``; its
importance is ``||W_in[i, :]||_2 * ||W_out[:, i]||_2`` (biases not counted), computed from the
source model's weights (the fine-tuned teacher's, when ``model.name_or_path`` names it). Each layer
keeps its ``ffn_width`` most important neurons (ties: the lower index first), in their original
order, so that the same width in every layer is an ordinary config: ``intermediate_size``
(DistilBERT: ``hidden_dim``) = ``ffn_width``, which ``save_pretrained`` writes and
``from_pretrained`` loads with no code of this project. With ``model.keep_layers`` the layers are
chosen first, then narrowed.

Attention heads are not pruned. transformers 5 has no ``prune_heads`` and no ``pruned_heads``
config key any more (4.x's BERT recorded per-layer pruned heads there and re-applied them on
loading); its attention reads the head count from ``num_attention_heads`` and the head size from
``hidden_size / num_attention_heads``, the same in every layer, so a model with fewer heads of the
same size is not an ordinary config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qa_lightning.core.errors import ConfigError
from qa_lightning.core.tokenizer import load_model_config
from qa_lightning.model.layers import encoder_layers

KEY = "model.ffn_width"
#: The config key of the feed-forward width, by ``model_type``; all others: ``intermediate_size``.
SIZE_KEYS = {"distilbert": "hidden_dim"}
#: The two linear layers of a transformer layer's feed-forward block (in, out): BERT, MiniLM,
#: RoBERTa, ELECTRA ...; DistilBERT.
FFN_LINEARS = (("intermediate.dense", "output.dense"), ("ffn.lin1", "ffn.lin2"))


def size_key(model_type: str) -> str:
    """The config key that holds the feed-forward width of a ``model_type``."""
    return SIZE_KEYS.get(model_type, "intermediate_size")


def check_ffn_width(ffn_width: Any, intermediate_size: int | None = None) -> None:
    """``ffn_width`` is ``None`` or a positive integer, at most ``intermediate_size`` (when
    given)."""
    if ffn_width is None:
        return
    if isinstance(ffn_width, bool) or not isinstance(ffn_width, int) or ffn_width < 1:
        raise ConfigError(
            f"invalid config: {KEY}={ffn_width!r}; give the number of feed-forward neurons to "
            f"keep in every layer, a positive integer (e.g. {KEY}=768), or null to keep them all."
        )
    if intermediate_size is not None and ffn_width > intermediate_size:
        raise ConfigError(
            f"invalid config: {KEY}={ffn_width}; the model's feed-forward layers have "
            f"{intermediate_size} neurons: keep at most that many ({KEY}={intermediate_size} "
            "keeps them all), or set it to null."
        )


def source_intermediate_size(
    name_or_path: str, config_overrides: Mapping[str, Any] | None = None
) -> int:
    """The feed-forward width of ``name_or_path``'s config (with the overrides)."""
    config = load_model_config(name_or_path, config_overrides, f"to check {KEY}")
    key = size_key(config.model_type)
    if not isinstance(getattr(config, key, None), int):
        raise ConfigError(
            f"{KEY} is not supported for model '{name_or_path}' ({config.model_type}): its "
            f"config has no {key}. Set {KEY}=null."
        )
    return int(getattr(config, key))


def validate_ffn_width(model: Any) -> None:
    """``model.ffn_width`` of a model config: its form, then its range against the config of
    ``model.name_or_path`` (a small file: no weights are loaded)."""
    ffn_width = model.get("ffn_width")
    check_ffn_width(ffn_width)
    if ffn_width is not None:
        overrides = model.get("config_overrides")
        check_ffn_width(ffn_width, source_intermediate_size(str(model.name_or_path), overrides))


def neuron_importance(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``||w_in[i, :]||_2 * ||w_out[:, i]||_2`` of each neuron ``i`` (in float64), for ``w_in``
    of shape [intermediate, hidden] and ``w_out`` of shape [hidden, intermediate]."""
    return w_in.double().norm(dim=1) * w_out.double().norm(dim=0)


def kept_neurons(importance: torch.Tensor, ffn_width: int) -> torch.Tensor:
    """The indices of the ``ffn_width`` most important neurons, ascending; among equal
    importances the lower index is kept."""
    order = torch.sort(importance, descending=True, stable=True).indices
    return order[:ffn_width].sort().values


def submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``module``'s submodule at the dotted ``path``, or ``None``."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def ffn_linears(layer: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear, str, str]:
    """The feed-forward block's input and output ``Linear`` of a transformer layer, and their
    attribute paths."""
    for in_path, out_path in FFN_LINEARS:
        w_in, w_out = submodule(layer, in_path), submodule(layer, out_path)
        if isinstance(w_in, torch.nn.Linear) and isinstance(w_out, torch.nn.Linear):
            return w_in, w_out, in_path, out_path
    raise ConfigError(
        f"{KEY} is not supported for {type(layer).__name__}: it needs layers whose feed-forward "
        "block is intermediate.dense + output.dense (BERT, MiniLM, RoBERTa, ELECTRA) or "
        f"ffn.lin1 + ffn.lin2 (DistilBERT). Set {KEY}=null."
    )


def sliced_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A copy of ``linear`` with only the rows (``dim=0``: outputs, and their biases) or the
    columns (``dim=1``: inputs) ``index`` of its weight."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    sliced = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype
    )
    sliced.weight = torch.nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        sliced.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return sliced.train(linear.training)


def prune_ffn(model: torch.nn.Module, ffn_width: int) -> torch.nn.Module:
    """``model`` with the ``ffn_width`` most important neurons (:func:`neuron_importance`) of
    every layer's feed-forward block and its config's width set to ``ffn_width``; a width equal
    to the model's changes nothing. Returns ``model``, changed in place."""
    key = size_key(model.config.model_type)
    check_ffn_width(ffn_width, getattr(model.config, key, None))
    parent, list_name = encoder_layers(model, KEY)
    for layer in getattr(parent, list_name):
        w_in, w_out, in_path, out_path = ffn_linears(layer)
        check_ffn_width(ffn_width, w_in.out_features)
        if ffn_width == w_in.out_features:
            continue
        importance = neuron_importance(w_in.weight.detach(), w_out.weight.detach())
        kept = kept_neurons(importance, ffn_width)
        for path, linear, dim in ((in_path, w_in, 0), (out_path, w_out, 1)):
            parent, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent), name, sliced_linear(linear, kept, dim))
    setattr(model.config, key, ffn_width)
    return model
