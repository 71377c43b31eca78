"""Serve answers over HTTP: ``python -m qa_lightning.serve model_dir=RUN/hf_model`` (or
``ckpt_path=`` / ``onnx_path=``), a LitServe server on 127.0.0.1:8000 whose answers are
``predict``'s (see ``conf/serve.yaml`` and docs/serving.md)."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from qa_lightning.answers.settings import SETTING_KEYS
from qa_lightning.cli import CONFIG_PATH, report_errors
from qa_lightning.core.config import register_resolvers
from qa_lightning.core.errors import ConfigError

log = logging.getLogger(__name__)
register_resolvers()


def model_source(cfg: DictConfig) -> Any:
    """The :class:`~qa_lightning.serving.server.ModelSource` of ``model_dir`` / ``ckpt_path``
    / ``onnx_path``, checked."""
    from qa_lightning.serving.server import ModelSource

    model_dir, ckpt_path, onnx_path = (cfg.get(k) for k in ("model_dir", "ckpt_path", "onnx_path"))
    if bool(ckpt_path) + bool(onnx_path) + bool(model_dir and not onnx_path) != 1:
        raise ConfigError(
            "give exactly one of model_dir=PATH (a Hugging Face directory such as a training "
            "run's hf_model/), ckpt_path=PATH (a training checkpoint) or onnx_path=PATH (an "
            "ONNX export; model_dir may name its tokenizer's directory)."
        )
    if onnx_path and cfg.precision not in ("auto", "32-true"):
        raise ConfigError(
            f"invalid config: precision={cfg.precision!r} with onnx_path, which runs the "
            "exported model in its own precision; precision applies to model_dir and ckpt_path."
        )
    settings = {key: cfg.get(key) for key in SETTING_KEYS}
    return ModelSource(
        backend="onnx" if onnx_path else "torch",
        device=str(cfg.device),
        model_dir=str(model_dir) if model_dir else None,
        ckpt_path=str(ckpt_path) if ckpt_path else None,
        onnx_path=str(onnx_path) if onnx_path else None,
        batch_size=cfg.batch_size,
        precision=str(cfg.precision),
        trust_checkpoint=bool(cfg.get("trust_checkpoint")),
        settings={k: v for k, v in settings.items() if v is not None},
        threads=cfg.get("threads"),
        equal_length=cfg.get("equal_length"),
    )


def serve(cfg: DictConfig) -> None:
    """Check the config and the model (loaded once here on the CPU, so that a bad path or
    setting is a one-paragraph error), then run the server until SIGTERM or Ctrl-C."""
    try:
        from qa_lightning.serving import server
    except ImportError as error:
        raise ConfigError(
            f"serving needs LitServe ({error.name} is not installed): "
            "pip install 'qa-lightning[serve]'."
        ) from error
    settings = server.ServeSettings(**OmegaConf.to_container(cfg.serve, resolve=True))
    source = model_source(cfg)
    answerer = source.load("cpu")
    info = server.describe(answerer, source)
    del answerer  # the inference workers load their own
    app = server.build_server(source, settings, info)
    where = f"http://{settings.host}:{settings.port}/"
    log.info("serving %s (%s, %s) at %s", info["model"], info["backend"], info["precision"], where)
    server.run_server(app, settings)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
def main(cfg: DictConfig) -> None:
    report_errors(lambda: serve(cfg))


if __name__ == "__main__":
    main()
