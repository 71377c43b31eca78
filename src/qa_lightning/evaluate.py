"""Score a model on validation data: ``python -m qa_lightning.evaluate ckpt_path=... data=...``.

Runs ``trainer.validate`` with the training code's ``QAModule`` and ``SquadDataModule``, so a
checkpoint scores exactly as it did in training (see ``conf/eval.yaml``).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from qa_lightning.cli import explain_out_of_memory, report_errors
from qa_lightning.config import (
    register_resolvers,
    validate_data_config,
    validate_decoding_config,
    validate_max_length,
)
from qa_lightning.errors import ConfigError
from qa_lightning.export import checkpoint_model_config, read_checkpoint
from qa_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
register_resolvers()


def configure_model_source(cfg: DictConfig) -> dict[str, str]:
    """Point ``cfg.model`` at the checkpoint's architecture or at ``model_dir``; returns the source.

    The data module's tokenizer follows through ``${model.name_or_path}``.
    """
    ckpt_path, model_dir = cfg.get("ckpt_path"), cfg.get("model_dir")
    if cfg.get("onnx_path"):
        return configure_onnx_source(cfg)
    if bool(ckpt_path) == bool(model_dir):
        raise ConfigError(
            "give exactly one of ckpt_path=PATH (a training checkpoint, e.g. "
            "outputs/train/RUN/checkpoints/best-....ckpt), model_dir=PATH (a Hugging Face "
            "model directory, e.g. outputs/train/RUN/hf_model) or onnx_path=PATH (an ONNX "
            "export, e.g. outputs/export/RUN/onnx_int8_model/model.onnx)."
        )
    with open_dict(cfg):
        if ckpt_path:
            model_config = checkpoint_model_config(read_checkpoint(ckpt_path), ckpt_path)
            # architecture only: the weights are restored from the checkpoint by trainer.validate
            cfg.model.name_or_path = model_config["name_or_path"]
            cfg.model.config_overrides = model_config["config_overrides"]
            cfg.model.from_scratch = True
            return {"source": str(ckpt_path), "source_type": "checkpoint"}
        if not Path(model_dir).is_dir():
            raise ConfigError(
                f"model_dir='{model_dir}' is not a directory (resolved to "
                f"'{Path(model_dir).resolve()}'); training writes one to <run dir>/hf_model."
            )
        cfg.model.name_or_path = str(model_dir)
        cfg.model.config_overrides = None
        cfg.model.from_scratch = False
        return {"source": str(model_dir), "source_type": "model_dir"}


def configure_onnx_source(cfg: DictConfig) -> dict[str, str]:
    """Point ``cfg.model`` at an ONNX export (``onnx_path``, its tokenizer beside it) run by
    onnxruntime in ``OnnxQAModule``, on the CPU in its own precision; returns the source."""
    if cfg.get("ckpt_path") or cfg.get("model_dir"):
        raise ConfigError(
            "give exactly one of ckpt_path=PATH, model_dir=PATH or onnx_path=PATH (an ONNX "
            "export, scored with onnxruntime)."
        )
    onnx_path = Path(cfg.onnx_path)
    if onnx_path.is_dir():
        onnx_path = onnx_path / "model.onnx"
    if not onnx_path.is_file():
        raise ConfigError(
            f"onnx_path='{onnx_path}' does not exist (resolved to '{onnx_path.resolve()}'); "
            "export one with python -m qa_lightning.export ckpt_path=... format=onnx."
        )
    if not (onnx_path.parent / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"onnx_path='{onnx_path}' has no tokenizer beside it; evaluate the directory that "
            "python -m qa_lightning.export wrote (model.onnx with its tokenizer and settings)."
        )
    with open_dict(cfg):
        cfg.model._target_ = "qa_lightning.model.onnx_model.OnnxQAModule"
        cfg.model.onnx_path = str(onnx_path)
        cfg.model.name_or_path = str(onnx_path.parent)  # the tokenizer, for the data module
        cfg.model.config_overrides = None
        cfg.model.from_scratch = False
        cfg.model.compile = False
        if (cfg.trainer.get("accelerator"), cfg.trainer.get("precision")) != ("cpu", "32-true"):
            log.info(
                "onnxruntime runs the ONNX model on the CPU in its own precision: "
                "trainer.accelerator=cpu and trainer.precision=32-true"
            )
        cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"
    return {"source": str(onnx_path), "source_type": "onnx"}


def validate_eval_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key and the fix, before data are tokenised or a model is loaded."""
    with open_dict(cfg):
        for key in ("train_file", "train_samples"):  # evaluation reads no training data
            if key in cfg.data and OmegaConf.is_missing(cfg.data, key):
                cfg.data[key] = None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required config value(s) {missing}: set them on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing)
        )
    data = cfg.data
    if not data.get("validation_file") and not data.get("dataset_name"):
        raise ConfigError(
            "no validation data: set data.validation_file=PATH (SQuAD json, jsonl or parquet), "
            "or data.dataset_name=squad to load it from the hub."
        )
    # evaluation reads no training data: check the data config as if it were the validation data
    data = data.copy()
    with open_dict(data):
        data.train_file, data.train_samples = data.validation_file, None
    validate_data_config(data)
    validate_decoding_config(cfg.postprocess)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate once; write ``metrics.json``, ``predictions.json`` and the resolved config to the
    run dir. Returns the metrics written."""
    source = configure_model_source(cfg)
    validate_eval_config(cfg)
    validate_max_length(cfg.data.max_length, load_tokenizer(cfg.data.tokenizer_name_or_path))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # trainer first: its config errors (precision, accelerator ...) surface before any work
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_model_summary=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")  # data errors surface before the model is loaded
    model = instantiate(cfg.model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # validation needs the training callbacks' states no more than the optimizer's
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        with explain_out_of_memory(
            "evaluating",
            {
                "data.eval_batch_size": cfg.data.eval_batch_size,
                "data.max_length": cfg.data.max_length,
                "trainer.precision": cfg.trainer.get("precision"),
            },
            "halve data.eval_batch_size (scores do not depend on it), or use "
            "trainer.precision=bf16-mixed on a GPU.",
        ):
            # our own checkpoints hold OmegaConf hyperparameters: not weights_only-loadable
            trainer.validate(
                model,
                datamodule=datamodule,
                ckpt_path=cfg.get("ckpt_path"),
                weights_only=False,
                verbose=False,
            )
    wall_time = time.perf_counter() - start

    examples = datamodule.val_examples
    # the module's own scoring of the epoch's predictions (it logs them as float32 val/em, val/f1)
    scores = model.last_scores
    metrics = {
        **scores,
        "questions": len(examples),
        "windows": len(datamodule.val_windows),
        **source,
        "data": datamodule.hparams.validation_file
        or f"{datamodule.hparams.dataset_name}:{datamodule.hparams.validation_split}",
        "skipped_records": len(datamodule.skipped.get("validation", {})),
        "wall_time_s": round(wall_time, 1),
    }
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output_dir / "predictions.json").write_text(
            json.dumps(model.last_predictions, indent=1, ensure_ascii=False)
        )
    log.info(
        "%s: em %.2f f1 %.2f on %d questions; wrote %s",
        source["source"],
        scores["em"],
        scores["f1"],
        len(examples),
        output_dir / "metrics.json",
    )
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    """Returns ``f1``."""
    return report_errors(lambda: evaluate(cfg))["f1"]


if __name__ == "__main__":
    main()
