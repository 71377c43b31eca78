"""A QA model to train or answer with: :func:`load_qa_model`, without Lightning (the server's
inference workers and ``predict`` import this, not :mod:`.module`)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering

from qa_lightning.core.errors import ConfigError
from qa_lightning.core.tokenizer import OFFLINE_HINT
from qa_lightning.model.layers import select_layers
from qa_lightning.model.width import prune_ffn


def load_qa_model(
    name_or_path: str,
    from_scratch: bool = False,
    config_overrides: dict | None = None,
    keep_layers: list[int] | None = None,
    trained_head: bool = False,
    ffn_width: int | None = None,
) -> torch.nn.Module:
    """A pretrained QA model, or with ``from_scratch`` a randomly initialised one whose config is
    ``name_or_path``'s updated with ``config_overrides`` (e.g. a 2-layer model for tests); with
    ``keep_layers`` only those transformer layers of it (a student, see :mod:`.layers`), then with
    ``ffn_width`` only that many feed-forward neurons in each layer (see :mod:`.width`). With
    ``trained_head`` (a model to answer with), weights that ``name_or_path`` lacks, such as the
    QA head of a base encoder, are a :class:`ConfigError` instead of random values.

    Weights are fp32 whatever the checkpoint stores or the config's ``dtype`` says (transformers
    5 builds and loads in that dtype, common on the hub as float16/bfloat16): mixed precision
    trains fp32 master weights, 16-mixed's grad scaler rejects fp16, and fp32 weights loaded back
    into a rebuilt model (a checkpoint, a teacher, the fp32 reference of the int8 check) must not
    be rounded. The model's config then says float32.
    """
    overrides = {
        key: value
        for key, value in (config_overrides or {}).items()
        if key not in ("dtype", "torch_dtype")
    }
    try:
        if from_scratch:
            config = AutoConfig.from_pretrained(name_or_path, **overrides)
            model = AutoModelForQuestionAnswering.from_config(config, dtype=torch.float32)
        else:
            model, loading = AutoModelForQuestionAnswering.from_pretrained(
                name_or_path, dtype=torch.float32, output_loading_info=True, **overrides
            )
            if trained_head and loading["missing_keys"]:
                missing = ", ".join(sorted(loading["missing_keys"]))
                raise ConfigError(
                    f"'{name_or_path}' is not a question-answering model: it lacks {missing}, "
                    "which would answer with random weights (a base encoder, such as the demo "
                    "model's package, has no QA head). Fine-tune it first: python -m "
                    f"qa_lightning.train model.name_or_path={name_or_path} ..., then answer with "
                    "the run's hf_model/."
                )
        model.float()
        model.config.dtype = torch.float32
    except ConfigError:
        raise
    except Exception as error:  # hub, file and config errors come in many types
        text = str(error).strip().splitlines()
        raise ConfigError(
            f"could not load model '{name_or_path}' ({type(error).__name__}: "
            f"{text[0] if text else ''}). Check model.name_or_path"
            + (" and model.config_overrides" if config_overrides else "")
            + f". {OFFLINE_HINT}"
        ) from error
    if keep_layers is not None:
        select_layers(model, keep_layers)
    return model if ffn_width is None else prune_ffn(model, ffn_width)
