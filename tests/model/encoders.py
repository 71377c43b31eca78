"""Random small encoders of the families that students are made from (built locally, no hub)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    PretrainedConfig,
    RobertaConfig,
)

#: MiniLM's vocabulary: the rebuilt checkpoints name its tokenizer, which must fit the model.
SIZES = {"vocab_size": 30522, "max_position_embeddings": 64}


def small_configs(layers: int) -> dict[str, Callable[[], PretrainedConfig]]:
    """Configs of ``layers``-layer encoders, hidden size 16, 2 heads, 32 feed-forward neurons."""
    bert_like = {
        "hidden_size": 16,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        **SIZES,
    }
    return {
        "bert": lambda: BertConfig(**bert_like),
        "distilbert": lambda: DistilBertConfig(
            dim=16, n_layers=layers, n_heads=2, hidden_dim=32, **SIZES
        ),
        "roberta": lambda: RobertaConfig(pad_token_id=1, **bert_like),
        "electra": lambda: ElectraConfig(embedding_size=16, **bert_like),
    }
