"""Score a model on validation data: ``python -m qa_lightning.evaluate ckpt_path=... data=...``.

Runs ``trainer.validate`` with the training code's ``QAModule`` and ``SquadDataModule``, so a
checkpoint scores exactly as it did in training (see ``conf/eval.yaml``): with the model's own
config, tokenizer, windowing and decoding, unless given on the command line.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from qa_lightning.answers.config import validate_decoding_config
from qa_lightning.answers.settings import SETTINGS_FILE, InferenceSettings, check_model_dir
from qa_lightning.cli import (
    explain_out_of_memory,
    hydra_main,
    quiet_output,
    report_errors,
    write_results,
)
from qa_lightning.core.config import register_resolvers, validate_max_length
from qa_lightning.core.errors import ConfigError
from qa_lightning.core.integrity import write_atomic
from qa_lightning.core.tokenizer import load_model_tokenizer
from qa_lightning.data.config import validate_data_config
from qa_lightning.runs.checkpoint_reading import (
    checkpoint_model_source,
    checkpoint_settings,
    load_checkpoint_file,
    read_checkpoint,
    trust_setting,
)
from qa_lightning.serving.answerer import resolve_onnx_path
from qa_lightning.serving.model_keys import GivenModel, given_model

log = logging.getLogger(__name__)
register_resolvers()


#: The windowing and decoding a model carries: :class:`InferenceSettings` field -> config key.
SETTING_KEYS = {
    "max_length": "data.max_length",
    "stride": "data.stride",
    "max_question_tokens": "data.max_question_tokens",
    "version_2_with_negative": "data.version_2_with_negative",
    "n_best": "postprocess.n_best",
    "max_answer_length": "postprocess.max_answer_length",
    "null_score_diff_threshold": "postprocess.null_score_diff_threshold",
}
#: Where a checkpoint's config and tokenizer files are written in the run dir.
CHECKPOINT_MODEL_DIR = "checkpoint_model"


def command_line_keys() -> set[str]:
    """The config keys that the command line's overrides set (none outside a Hydra run)."""
    if not HydraConfig.initialized():
        return set()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {override.key_or_group for override in overrides}


def use_saved_settings(
    cfg: DictConfig, saved: dict[str, Any], origin: str, given: set[str]
) -> dict[str, str]:
    """Set ``cfg``'s windowing and decoding (:data:`SETTING_KEYS`) to the model's ``saved``
    values, except the keys in ``given`` (the command line's), and log them. Returns each key's
    origin: ``origin`` or ``"command line"``.

    ``model.n_best`` and the like interpolate ``postprocess.*`` and ``data.*``: giving either
    counts as giving the setting.
    """
    origins, described = {}, []
    for name, key in SETTING_KEYS.items():
        if name not in saved:
            continue
        alias = f"model.{name}"
        if key in given or alias in given:
            origins[key] = "command line"
            value = OmegaConf.select(cfg, alias if alias in given else key)
            described.append(f"{key}={value} (command line; the {origin}'s: {saved[name]})")
        else:
            OmegaConf.update(cfg, key, saved[name])
            origins[key] = origin
            described.append(f"{key}={saved[name]}")
    if described:
        log.info("windowing and decoding of the %s: %s", origin, ", ".join(described))
    return origins


def configure_model_source(cfg: DictConfig, model: GivenModel | None = None) -> dict[str, str]:
    """Point ``cfg.model`` and the data module's tokenizer at the model that ``model_dir``,
    ``ckpt_path`` or ``onnx_path`` names (``model``: :func:`given_model` of ``cfg``): a
    checkpoint's embedded config and tokenizer (written to ``<run dir>/checkpoint_model``, or for
    a checkpoint of an earlier version its base model), a Hugging Face directory or an ONNX
    export; and the windowing and decoding at the model's saved settings except those given on
    the command line. Returns the source."""
    model = model or given_model(cfg)
    if model.key == "onnx_path":
        return configure_onnx_source(cfg, model)
    with open_dict(cfg):
        cfg.model.keep_layers = None  # the checkpoint's (or directory's) config has its layers
        cfg.model.ffn_width = None  # ... and its feed-forward width
        if model.key == "ckpt_path":
            ckpt_path = cfg.ckpt_path
            checkpoint = read_checkpoint(ckpt_path, trust_setting(cfg))
            directory = Path(cfg.paths.output_dir) / CHECKPOINT_MODEL_DIR
            source = checkpoint_model_source(checkpoint, ckpt_path, directory)
            # architecture only: the weights are restored from the checkpoint by trainer.validate
            cfg.model.name_or_path = source.name_or_path
            cfg.model.config_overrides = source.config_overrides
            cfg.model.from_scratch = True
            cfg.data.tokenizer_name_or_path = source.tokenizer_name_or_path
            saved = checkpoint_settings(checkpoint)
            use_saved_settings(cfg, saved, "checkpoint", command_line_keys())
            return {"source": str(ckpt_path), "source_type": "checkpoint"}
        model_dir = cfg.model_dir
        check_model_dir(model_dir)
        cfg.model.name_or_path = str(model_dir)
        cfg.model.config_overrides = None
        cfg.model.from_scratch = False
        use_directory_settings(cfg, model_dir, "model directory")
        return {"source": str(model_dir), "source_type": "model_dir"}


def use_directory_settings(cfg: DictConfig, directory: str | Path, origin: str) -> None:
    """:func:`use_saved_settings` with the settings an export wrote into ``directory`` (those
    it holds: an earlier export's lack some)."""
    settings_file = Path(directory) / SETTINGS_FILE
    if settings_file.is_file():
        settings = asdict(InferenceSettings.from_dir(directory))  # checks the file
        written = json.loads(settings_file.read_text())
        saved = {name: value for name, value in settings.items() if name in written}
        use_saved_settings(cfg, saved, origin, command_line_keys())


def configure_onnx_source(cfg: DictConfig, model: GivenModel) -> dict[str, str]:
    """Point ``cfg.model`` at an ONNX export (``onnx_path``; its tokenizer and settings beside
    it, or in ``model_dir``) run by onnxruntime in ``OnnxQAModule``, on the CPU in its own
    precision; returns the source."""
    onnx_path = resolve_onnx_path(model.path)
    tokenizer_dir = model.tokenizer_dir or onnx_path.parent
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        where = (
            f"model_dir='{tokenizer_dir}' (the tokenizer of onnx_path) holds no tokenizer"
            if model.tokenizer_dir
            else f"onnx_path='{onnx_path}' has no tokenizer beside it"
        )
        raise ConfigError(
            f"{where}; evaluate the directory that python -m qa_lightning.export wrote "
            "(model.onnx with its tokenizer and settings)."
        )
    check_model_dir(tokenizer_dir)
    with open_dict(cfg):
        use_directory_settings(cfg, tokenizer_dir, "ONNX export")
        cfg.model._target_ = "qa_lightning.model.onnx_model.OnnxQAModule"
        cfg.model.onnx_path = str(onnx_path)
        cfg.model.name_or_path = str(tokenizer_dir)  # the tokenizer, for the data module
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


def check_data_choice(cfg: DictConfig) -> None:
    """Evaluation has no default data: without ``data=...`` say how to give validation data,
    before anything is read or downloaded."""
    if cfg.get("data") is None:
        raise ConfigError(
            "no validation data: choose them with data=..., e.g. data=demo (the shipped demo "
            "questions), data=local data.validation_file=FILE (SQuAD json, jsonl or parquet), "
            "data=mrqa data.validation_file=FILE, or data=sample (SQuAD's validation split from "
            "the Hugging Face hub); the windowing and decoding stay the model's."
        )


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
    model = given_model(cfg)  # the model keys, then the data choice: before anything is read
    check_data_choice(cfg)
    source = configure_model_source(cfg, model)
    validate_eval_config(cfg)
    # checked to load with weights_only=True, or trusted (trust_checkpoint=true)
    weights_only = (
        load_checkpoint_file(cfg.ckpt_path, trust_setting(cfg))[1] if cfg.get("ckpt_path") else True
    )
    tokenizer = load_model_tokenizer(
        cfg.data.tokenizer_name_or_path, cfg.model.name_or_path, cfg.model.get("config_overrides")
    )
    validate_max_length(cfg.data.max_length, tokenizer)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # trainer first: its config errors (precision, accelerator ...) surface before any work
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_model_summary=False)
    datamodule = instantiate(cfg.data)
    if trainer.local_rank == 0:  # tokenised once per machine; data errors before the model loads
        datamodule.prepare_data("validate")
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
            trainer.validate(
                model,
                datamodule=datamodule,
                ckpt_path=cfg.get("ckpt_path"),
                weights_only=weights_only,
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
        write_results(output_dir, model.last_predictions, metrics)
    log.info(
        "%s: em %.2f f1 %.2f on %d questions; wrote %s",
        source["source"],
        scores["em"],
        scores["f1"],
        len(examples),
        output_dir / "metrics.json",
    )
    return metrics


@hydra_main("eval")
def main(cfg: DictConfig) -> float:
    """Returns ``f1``."""
    quiet_output(cfg)
    return report_errors(lambda: evaluate(cfg))["f1"]


if __name__ == "__main__":
    main()
