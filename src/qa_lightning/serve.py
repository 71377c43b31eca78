"""Serve answers over HTTP: ``python -m qa_lightning.serve model_dir=RUN/hf_model`` (or
``ckpt_path=`` / ``onnx_path=``), a LitServe server on 127.0.0.1:8000 whose answers are
``predict``'s (see ``conf/serve.yaml`` and docs/serving.md)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qa_lightning.answers.settings import SETTING_KEYS
from qa_lightning.cli import hydra_main, quiet_output, report_errors, verbose_output
from qa_lightning.core.config import register_resolvers
from qa_lightning.core.errors import ConfigError
from qa_lightning.serving.model_keys import check_onnx_precision, given_model

log = logging.getLogger(__name__)
register_resolvers()


def model_source(cfg: DictConfig) -> Any:
    """The :class:`~qa_lightning.serving.server.ModelSource` of ``model_dir`` / ``ckpt_path``
    / ``onnx_path``, checked (:func:`~qa_lightning.serving.model_keys.given_model`)."""
    from qa_lightning.serving.server import ModelSource

    model = given_model(cfg)
    check_onnx_precision(model, cfg.precision)
    settings = {key: cfg.get(key) for key in SETTING_KEYS}
    return ModelSource(
        backend=model.backend,
        device=str(cfg.device),
        **model.as_keys(),
        batch_size=cfg.batch_size,
        precision=str(cfg.precision),
        trust_checkpoint=bool(cfg.get("trust_checkpoint")),
        settings={k: v for k, v in settings.items() if v is not None},
        threads=cfg.get("threads"),
        equal_length=cfg.get("equal_length"),
    )


def serve(cfg: DictConfig) -> None:
    """Check the config and the model (loaded once on the CPU in a process of its own, so that
    a bad path or setting is a one-paragraph error and this process holds no model), then run
    the server until SIGTERM or Ctrl-C."""
    try:
        from qa_lightning.serving import server
    except ImportError as error:
        raise ConfigError(
            f"serving needs LitServe ({error.name} is not installed): "
            "pip install 'qa-lightning[serve]'."
        ) from error
    settings = server.ServeSettings(**OmegaConf.to_container(cfg.serve, resolve=True))
    source = model_source(cfg)
    server.check_port(settings)
    verbose = verbose_output(cfg)
    facts = server.inspect_apart(source, verbose)
    app = server.build_server(source, settings, facts, verbose)
    info = facts.info
    server.run_server(app, settings, f"{info['model']} ({info['backend']}, {info['precision']})")


@hydra_main("serve")
def main(cfg: DictConfig) -> None:
    quiet_output(cfg, libraries=())  # the workers quiet transformers: this process loads no model
    report_errors(lambda: serve(cfg))


if __name__ == "__main__":
    main()
