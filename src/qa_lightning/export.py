"""Export a trained checkpoint for serving: a Hugging Face directory or an ONNX model.

    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=hf
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx
    python -m qa_lightning.export model_dir=RUN/hf_model format=onnx
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx quantize=int8

A Hugging Face directory holds ``model.safetensors``, ``config.json``, the tokenizer and
``qa_lightning.json`` (the windowing and decoding the model was trained with, which
``qa_lightning.predict`` uses, and the size and SHA-256 digest of every other file, checked when
the directory is loaded). An ONNX directory holds ``model.onnx`` (checked against PyTorch
with onnxruntime) with the same files but the weights; with ``quantize=int8`` its ``model.onnx`` is
quantised to int8 (see :mod:`qa_lightning.quantize`). A directory is written whole or not at all
(:func:`~qa_lightning.integrity.staged_directory`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from qa_lightning.checkpointing import load_checkpoint_file, trust_setting
from qa_lightning.cli import report_errors
from qa_lightning.config import NULL_THRESHOLD_BEST, register_resolvers
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.errors import ConfigError, ExportError
from qa_lightning.inference import OUTPUT_NAMES, SETTINGS_FILE, InferenceSettings, check_model_dir
from qa_lightning.integrity import file_manifest, staged_directory
from qa_lightning.model_files import CHECKPOINT_KEY as MODEL_FILES_KEY
from qa_lightning.model_files import has_config, has_tokenizer, write_model_files
from qa_lightning.quantize import check_quantize_config, quantize_export
from qa_lightning.tokenizer import check_tokenizer_fits, load_tokenizer, model_vocab_size

log = logging.getLogger(__name__)
register_resolvers()

FORMATS = ("hf", "onnx")


@dataclass
class Exported:
    """A model ready to export: the Hugging Face model (eval mode), tokenizer and settings."""

    model: torch.nn.Module
    tokenizer: Any
    settings: InferenceSettings


def read_checkpoint(ckpt_path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint of this project, memory-mapped, checked to be intact and loaded
    with ``weights_only=True`` (with ``trust``, a checkpoint that needs Python's full unpickler
    is loaded with it: see :func:`~qa_lightning.checkpointing.load_checkpoint_file`)."""
    return load_checkpoint_file(ckpt_path, trust)[0]


def checkpoint_model_config(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """``name_or_path`` and ``config_overrides`` of the checkpoint's ``QAModule``: the config
    that builds its architecture. A student (``keep_layers``) is ``name_or_path``'s config with
    ``num_hidden_layers`` = the number of layers it kept."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "name_or_path" not in hparams:
        raise ConfigError(
            f"ckpt_path='{ckpt_path}' is not a qa_lightning checkpoint (its hyperparameters have "
            "no name_or_path); give a checkpoint written by python -m qa_lightning.train."
        )
    overrides = _plain(hparams.get("config_overrides"))
    if hparams.get("keep_layers") is not None:
        overrides = {**(overrides or {}), "num_hidden_layers": len(hparams["keep_layers"])}
    return {"name_or_path": str(hparams["name_or_path"]), "config_overrides": overrides}


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint's architecture (``name_or_path`` with ``config_overrides``) and
    tokenizer load from."""

    name_or_path: str
    config_overrides: dict[str, Any] | None
    tokenizer_name_or_path: str


def checkpoint_model_source(
    checkpoint: dict[str, Any], ckpt_path: str | Path, directory: str | Path
) -> ModelSource:
    """The checkpoint's own config and tokenizer files, written to ``directory``; for what a
    checkpoint of an earlier version lacks, its base model (``name_or_path``, the data module's
    tokenizer), which must then be reachable."""
    model_config = checkpoint_model_config(checkpoint, ckpt_path)
    files = checkpoint.get(MODEL_FILES_KEY)
    if has_config(files) or has_tokenizer(files):
        write_model_files(files, directory)
    base = model_config["name_or_path"]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    base_tokenizer = str(data.get("tokenizer_name_or_path") or base)
    missing = []
    if has_config(files):
        name_or_path, overrides = str(directory), None
    else:
        name_or_path, overrides = base, model_config["config_overrides"]
        if problem := _unreachable(base, "config"):
            missing.append(f"model config (base '{base}': {problem})")
    if has_tokenizer(files):
        tokenizer = str(directory)
    else:
        tokenizer = base_tokenizer
        if problem := _unreachable(base_tokenizer, "tokenizer"):
            missing.append(f"tokenizer files (base '{base_tokenizer}': {problem})")
    if missing:
        raise ConfigError(
            f"ckpt_path='{ckpt_path}' cannot rebuild its model: it holds no "
            f"{' and no '.join(missing)}, and its base cannot be loaded here (checkpoints of "
            "earlier qa_lightning versions rely on it). Use the checkpoint where its base can "
            "be reached (the machine and virtualenv that trained it; for a hub id, network "
            "access or the Hugging Face cache), and there run python -m qa_lightning.export "
            f"ckpt_path={ckpt_path} format=hf: it writes a self-contained model directory that "
            "evaluate model_dir=..., export model_dir=... and predict model_dir=... load anywhere."
        )
    return ModelSource(name_or_path, overrides, tokenizer)


def _unreachable(name_or_path: str, what: str) -> str | None:
    """Why the config or tokenizer of ``name_or_path`` cannot be loaded, or ``None``."""
    from transformers import AutoConfig, AutoTokenizer

    load = AutoConfig if what == "config" else AutoTokenizer
    try:
        load.from_pretrained(name_or_path)
    except Exception as error:  # hub and file errors come in many types
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return None


def checkpoint_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The windowing and decoding a checkpoint was trained with, by :class:`InferenceSettings`
    field (``null_score_diff_threshold`` may be ``best``); what an earlier version's checkpoint
    lacks is left out."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    settings = {}
    for field in fields(InferenceSettings):
        value = data.get(field.name)
        if value is None:
            value = hparams.get(field.name)
        if value is not None:
            settings[field.name] = value
    return settings


def tuned_null_threshold(checkpoint: dict[str, Any], ckpt_path: str | Path) -> float:
    """``best_f1_thresh`` of the checkpoint's last validation, the threshold that
    ``postprocess.null_score_diff_threshold=best`` serves."""
    threshold = ((checkpoint.get("qa_last") or {}).get("scores") or {}).get("best_f1_thresh")
    if threshold is None:
        raise ExportError(
            f"ckpt_path='{ckpt_path}' was trained with postprocess.null_score_diff_threshold=best "
            "but holds no validation's best_f1_thresh (it was saved before a validation ran, or "
            "by an earlier qa_lightning version); export a checkpoint saved after a validation "
            "(e.g. the run's best-*.ckpt), or give the threshold to predict as "
            "null_score_diff_threshold=NUMBER."
        )
    return float(threshold)


def load_checkpoint(ckpt_path: str | Path, trust: bool = False) -> Exported:
    """The Hugging Face model inside a training checkpoint, with its tokenizer and settings
    (``null_score_diff_threshold=best`` resolved to the tuned threshold)."""
    from qa_lightning.model import load_qa_model

    checkpoint = read_checkpoint(ckpt_path, trust)
    model_config = checkpoint_model_config(checkpoint, ckpt_path)
    with tempfile.TemporaryDirectory(prefix="qa_lightning_checkpoint_") as directory:
        source = checkpoint_model_source(checkpoint, ckpt_path, directory)
        # the weights come from the checkpoint: build the architecture without pretrained ones
        model = load_qa_model(source.name_or_path, True, source.config_overrides)
        tokenizer = load_tokenizer(source.tokenizer_name_or_path)
        check_tokenizer_fits(
            tokenizer, source.tokenizer_name_or_path, model.config.vocab_size, ckpt_path
        )
    state = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ExportError(
            f"the weights of ckpt_path='{ckpt_path}' do not fit model "
            f"'{model_config['name_or_path']}': {str(error).splitlines()[0]}"
        ) from error
    saved = checkpoint_settings(checkpoint)
    if saved.get("null_score_diff_threshold") == NULL_THRESHOLD_BEST:
        if saved.get("version_2_with_negative"):
            saved["null_score_diff_threshold"] = tuned_null_threshold(checkpoint, ckpt_path)
            log.info(
                "null_score_diff_threshold=best: exporting %s, the best_f1_thresh of the "
                "checkpoint's last validation",
                saved["null_score_diff_threshold"],
            )
        else:  # SQuAD v1.1: no null answers, the threshold is not used
            del saved["null_score_diff_threshold"]
    settings = InferenceSettings().updated(**saved)
    return Exported(model.eval(), tokenizer, settings)


def load_model_dir(model_dir: str | Path) -> Exported:
    """An exported Hugging Face directory, loaded back (checked against its manifest, and its
    tokenizer against the model's vocabulary)."""
    from qa_lightning.model import load_qa_model

    if not Path(model_dir).is_dir():
        raise ConfigError(f"model_dir='{model_dir}' is not a directory.")
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    check_tokenizer_fits(tokenizer, model_dir, model_vocab_size(str(model_dir)), model_dir)
    return Exported(
        load_qa_model(str(model_dir)).eval(), tokenizer, InferenceSettings.from_dir(model_dir)
    )


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir``, checked to be new, empty or an earlier export, which an export replaces
    whole; a directory with other files is refused, so that nothing else is deleted."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir='{out_dir}' is a file; give a directory to write into.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SETTINGS_FILE).is_file():
        raise ConfigError(
            f"out_dir='{out_dir}' holds files but no earlier export ({SETTINGS_FILE}); an export "
            "replaces its directory whole: give a new or empty directory, e.g. "
            f"out_dir={out_dir / 'export'}."
        )
    return out_dir


def _save_support_files(exported: Exported, directory: Path) -> None:
    """Config and tokenizer (all but the weights and the settings)."""
    exported.model.config.save_pretrained(directory)
    exported.tokenizer.save_pretrained(directory)


def _save_settings(
    exported: Exported, directory: Path, extra: dict[str, Any] | None = None
) -> None:
    """The settings (with ``extra`` entries) and the manifest of the directory's files: written
    last."""
    files = file_manifest(directory, exclude=(SETTINGS_FILE,))
    exported.settings.save(directory, files=files, extra=extra)


def save_hf(exported: Exported, out_dir: str | Path) -> Path:
    """Write model (safetensors), config, tokenizer and settings to ``out_dir``, whole or not at
    all (an earlier export there is replaced)."""
    out_dir = check_out_dir(out_dir)
    with staged_directory(out_dir) as staging:
        _save_support_files(exported, staging)
        exported.model.save_pretrained(staging)
        if not (staging / "model.safetensors").is_file():
            raise ExportError(f"save_pretrained wrote no model.safetensors for '{out_dir}'.")
        _save_settings(exported, staging)
    return out_dir


def export_hf(ckpt_path: str | Path, out_dir: str | Path, trust: bool = False) -> Path:
    """A training checkpoint -> a Hugging Face directory that ``from_pretrained`` (and the
    transformers 4 ``question-answering`` pipeline) loads. Returns ``out_dir``."""
    out_dir = save_hf(load_checkpoint(ckpt_path, trust), out_dir)
    log.info("exported %s as a Hugging Face model directory to %s", ckpt_path, out_dir)
    return out_dir


def try_export_hf(ckpt_path: str | Path, out_dir: str | Path, trust: bool = False) -> str | None:
    """:func:`export_hf` for the end of training: a failure (e.g. a sharded DeepSpeed checkpoint)
    is logged with the command to retry, and gives ``None``, so that the run's results are kept."""
    try:
        return str(export_hf(ckpt_path, out_dir, trust))
    except Exception as error:  # the run's metrics matter more than its export
        log.warning(
            "could not export %s as a Hugging Face directory (%s: %s); retry with "
            "python -m qa_lightning.export ckpt_path=%s format=hf",
            ckpt_path,
            type(error).__name__,
            error,
            ckpt_path,
        )
        return None


def onnx_input_names(model: torch.nn.Module, tokenizer: Any) -> list[str]:
    """The model inputs that the tokenizer produces and the model's forward takes, in
    ``MODEL_INPUTS`` order (``token_type_ids`` only where the model uses them)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    produced = set(tokenizer.model_input_names)
    return [name for name in MODEL_INPUTS if name in produced and name in accepted]


class _LogitsOnly(torch.nn.Module):
    """Positional inputs -> ``(start_logits, end_logits)``, the signature ONNX export traces."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(**dict(zip(self.input_names, inputs, strict=True)))
        return outputs.start_logits, outputs.end_logits


#: (question, context) pairs of different lengths: the traced batch has padding, so the attention
#: mask stays in the graph.
EXAMPLE_PAIRS = [
    ("Who wrote it?", "The report was written by the committee in 1998 after a long inquiry."),
    ("When?", "In 1998."),
]
CHECK_PAIRS = [
    ("What did the committee find?", "The committee found that the bridge was unsafe. " * 6),
    ("Where is the bridge?", "The bridge is in the north of the city, near the old harbour."),
    ("Which year?", "1998"),
]


def _encode(tokenizer: Any, pairs: list[tuple[str, str]], names: list[str]) -> list[torch.Tensor]:
    questions, contexts = zip(*pairs, strict=True)
    encoded = tokenizer(list(questions), list(contexts), padding=True, return_tensors="pt")
    return [encoded[name] for name in names]


def export_onnx(exported: Exported, out_dir: str | Path, opset: int = 17) -> Path:
    """Write ``model.onnx`` (dynamic batch and sequence axes, outputs ``start_logits`` and
    ``end_logits``) with the Hugging Face files beside it, whole or not at all. Returns the ONNX
    file."""
    return export_checked_onnx(exported, out_dir, opset)[0]


def export_checked_onnx(
    exported: Exported,
    out_dir: str | Path,
    opset: int = 17,
    atol: float | None = None,
    finish: Callable[[Path], dict[str, Any]] | None = None,
) -> tuple[Path, float | None, dict[str, Any]]:
    """:func:`export_onnx`; with ``atol``, the ONNX model's logits are compared with PyTorch's
    (:func:`onnx_max_abs_diff`) before the directory is put in place, and a difference above
    ``atol`` is an :class:`ExportError` that leaves nothing written. ``finish`` (e.g. int8
    quantisation) then rewrites the checked ``model.onnx``; the entries it returns are saved with
    the settings. Returns the ONNX file, the difference (``None`` without ``atol``) and those
    entries."""
    out_dir = check_out_dir(out_dir)
    with staged_directory(out_dir) as staging:
        _save_support_files(exported, staging)
        _write_onnx(exported, staging / "model.onnx", opset)
        diff = None if atol is None else onnx_max_abs_diff(exported, staging / "model.onnx")
        if diff is not None and diff > atol:
            raise ExportError(
                f"the ONNX model's logits differ from PyTorch's by up to {diff:.2e}, more than "
                f"atol={atol}; nothing was written. Try another opset, or raise atol if the "
                "difference is acceptable."
            )
        extra = finish(staging / "model.onnx") if finish else {}
        _save_settings(exported, staging, extra)
    log.info("exported ONNX model to %s", out_dir / "model.onnx")
    return out_dir / "model.onnx", diff, extra


def _write_onnx(exported: Exported, onnx_path: Path, opset: int) -> None:
    names = onnx_input_names(exported.model, exported.tokenizer)
    wrapper = _LogitsOnly(exported.model, names).eval()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in (*names, *OUTPUT_NAMES)}
    try:
        with warnings.catch_warnings():
            # the check against onnxruntime below guards what these warnings are about
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                wrapper,
                tuple(_encode(exported.tokenizer, EXAMPLE_PAIRS, names)),
                str(onnx_path),
                dynamo=False,  # the TorchScript exporter: no onnxscript dependency
                input_names=names,
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
            )
    except Exception as error:  # the exporter raises many types
        raise ExportError(
            f"torch.onnx.export failed for opset {opset} ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); try another "
            "opset (e.g. opset=18)."
        ) from error
    exported.model.eval()  # export restores the wrapper's mode: make sure no dropout is left on
    log.info("traced the ONNX graph with inputs %s", names)


def onnx_max_abs_diff(exported: Exported, onnx_path: str | Path) -> float:
    """Largest absolute difference between the start/end logits of onnxruntime and PyTorch on
    batches whose shapes differ from the traced one (padded and unpadded)."""
    from qa_lightning.inference import OnnxLogits

    session = OnnxLogits(onnx_path)
    names = session.input_names
    wrapper = _LogitsOnly(exported.model, names).eval()
    diff = 0.0
    for pairs in (CHECK_PAIRS, CHECK_PAIRS[1:2]):
        inputs = _encode(exported.tokenizer, pairs, names)
        with torch.inference_mode():
            expected = wrapper(*inputs)
        actual = session(dict(zip(names, inputs, strict=True)))
        for a, e in zip(actual, expected, strict=True):
            diff = max(diff, float((a - e.float()).abs().max()))
    return diff


def export(cfg: DictConfig) -> dict[str, Any]:
    """Run an export as configured in ``conf/export.yaml``; returns what was written."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"invalid config: format={cfg.format!r}; use one of {list(FORMATS)}.")
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("model_dir")):
        raise ConfigError(
            "give exactly one of ckpt_path=PATH (a training checkpoint) or model_dir=PATH "
            "(a Hugging Face directory, for format=onnx)."
        )
    if cfg.format == "hf" and not cfg.get("ckpt_path"):
        raise ConfigError("format=hf exports a checkpoint: give ckpt_path=PATH, not model_dir.")
    if cfg.format == "onnx":
        _check_onnx_config(cfg)
    recipe = check_quantize_config(cfg)
    default_name = f"{cfg.format}_{cfg.quantize}_model" if recipe else f"{cfg.format}_model"
    out_dir = check_out_dir(cfg.get("out_dir") or Path(cfg.paths.output_dir) / default_name)
    if cfg.get("ckpt_path"):
        exported = load_checkpoint(cfg.ckpt_path, trust_setting(cfg))
    else:
        exported = load_model_dir(cfg.model_dir)
    try:
        if cfg.format == "hf":
            path = save_hf(exported, out_dir)
            print(f"wrote Hugging Face model directory {path}")
            return {"format": "hf", "path": str(path)}
        finish = partial(quantize_export, exported, recipe=recipe, cfg=cfg) if recipe else None
        onnx_path, diff, extra = export_checked_onnx(exported, out_dir, cfg.opset, cfg.atol, finish)
    except OSError as error:
        raise ExportError(
            f"cannot write the export to out_dir='{out_dir}' ({error.strerror or error}); free "
            "disk space or give a writable out_dir=DIR."
        ) from error
    print(
        f"wrote {onnx_path}; max abs diff of start/end logits, onnxruntime vs PyTorch: {diff:.2e}"
    )
    return {"format": "onnx", "path": str(onnx_path), "max_abs_diff": diff, **extra}


def _check_onnx_config(cfg: DictConfig) -> None:
    """``opset`` and ``atol`` values, and the packages an ONNX export needs."""
    opset, atol = cfg.opset, cfg.atol
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 7:
        raise ConfigError(f"invalid config: opset={opset!r}; use an ONNX opset such as 17.")
    if not isinstance(atol, int | float) or isinstance(atol, bool) or not atol >= 0:
        raise ConfigError(f"invalid config: atol={atol!r}; use a tolerance >= 0 such as 1e-4.")
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"format=onnx needs the package(s) {missing}: pip install 'qa-lightning[export]' "
            "(or export format=hf, which needs neither)."
        )


def _plain(value: Any) -> Any:
    """OmegaConf containers (as saved in hyperparameters) -> plain Python objects."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    report_errors(lambda: export(cfg))


if __name__ == "__main__":
    main()
