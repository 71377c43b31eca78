"""Export a trained checkpoint for serving: a Hugging Face directory or an ONNX model.

    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=hf
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx
    python -m qa_lightning.export model_dir=RUN/hf_model format=onnx
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx quantize=int8

A Hugging Face directory holds ``model.safetensors``, ``config.json``, the tokenizer and
``qa_lightning.json`` (the windowing and decoding the model was trained with, which
``qa_lightning.predict`` uses). An ONNX directory holds ``model.onnx`` (checked against PyTorch
with onnxruntime) with the same files but the weights; with ``quantize=int8`` its ``model.onnx`` is
quantised to int8 (see :mod:`qa_lightning.quantize`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from qa_lightning.cli import report_errors
from qa_lightning.config import register_resolvers
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.errors import ConfigError, ExportError
from qa_lightning.inference import OUTPUT_NAMES, InferenceSettings
from qa_lightning.quantize import check_quantize_config, quantize_export
from qa_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
register_resolvers()

FORMATS = ("hf", "onnx")


@dataclass
class Exported:
    """A model ready to export: the Hugging Face model (eval mode), tokenizer and settings."""

    model: torch.nn.Module
    tokenizer: Any
    settings: InferenceSettings


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of this project, memory-mapped.

    Its hyperparameters hold OmegaConf objects, so it is unpickled with ``weights_only=False``:
    load only checkpoints you trust (your own training runs).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path='{path}' does not exist (resolved to '{path.resolve()}'); training runs "
            "keep theirs in <run dir>/checkpoints/."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # pickle, zip and torch errors come in many types
        raise ConfigError(
            f"ckpt_path='{path}' is not a readable PyTorch checkpoint ({type(error).__name__})."
        ) from error


def checkpoint_model_config(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """``name_or_path`` and ``config_overrides`` of the checkpoint's ``QAModule``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "name_or_path" not in hparams:
        raise ConfigError(
            f"ckpt_path='{ckpt_path}' is not a qa_lightning checkpoint (its hyperparameters have "
            "no name_or_path); give a checkpoint written by python -m qa_lightning.train."
        )
    return {
        "name_or_path": str(hparams["name_or_path"]),
        "config_overrides": _plain(hparams.get("config_overrides")),
    }


def load_checkpoint(ckpt_path: str | Path) -> Exported:
    """The Hugging Face model inside a training checkpoint, with its tokenizer and settings."""
    from qa_lightning.model import load_qa_model

    checkpoint = read_checkpoint(ckpt_path)
    model_config = checkpoint_model_config(checkpoint, ckpt_path)
    # the weights come from the checkpoint: build the architecture without loading pretrained ones
    model = load_qa_model(model_config["name_or_path"], True, model_config["config_overrides"])
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
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    hparams = checkpoint["hyper_parameters"]
    settings = InferenceSettings().updated(
        max_length=data.get("max_length"),
        stride=data.get("stride"),
        max_question_tokens=data.get("max_question_tokens"),
        n_best=hparams.get("n_best"),
        max_answer_length=hparams.get("max_answer_length"),
    )
    tokenizer = load_tokenizer(data.get("tokenizer_name_or_path") or model_config["name_or_path"])
    return Exported(model.eval(), tokenizer, settings)


def load_model_dir(model_dir: str | Path) -> Exported:
    """An exported Hugging Face directory, loaded back."""
    from qa_lightning.model import load_qa_model

    if not Path(model_dir).is_dir():
        raise ConfigError(f"model_dir='{model_dir}' is not a directory.")
    return Exported(
        load_qa_model(str(model_dir)).eval(),
        load_tokenizer(str(model_dir)),
        InferenceSettings.from_dir(model_dir),
    )


def save_support_files(exported: Exported, out_dir: str | Path) -> Path:
    """Write config, tokenizer and settings (all but the weights) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported.model.config.save_pretrained(out_dir)
    exported.tokenizer.save_pretrained(out_dir)
    exported.settings.save(out_dir)
    return out_dir


def save_hf(exported: Exported, out_dir: str | Path) -> Path:
    """Write model (safetensors), config, tokenizer and settings to ``out_dir``."""
    out_dir = save_support_files(exported, out_dir)
    exported.model.save_pretrained(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        raise ExportError(f"save_pretrained wrote no model.safetensors into '{out_dir}'.")
    return out_dir


def export_hf(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """A training checkpoint -> a Hugging Face directory that ``from_pretrained`` (and the
    transformers 4 ``question-answering`` pipeline) loads. Returns ``out_dir``."""
    out_dir = save_hf(load_checkpoint(ckpt_path), out_dir)
    log.info("exported %s as a Hugging Face model directory to %s", ckpt_path, out_dir)
    return out_dir


def try_export_hf(ckpt_path: str | Path, out_dir: str | Path) -> str | None:
    """:func:`export_hf` for the end of training: a failure (e.g. a sharded DeepSpeed checkpoint)
    is logged with the command to retry, and gives ``None``, so that the run's results are kept."""
    try:
        return str(export_hf(ckpt_path, out_dir))
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
    ``end_logits``) with the Hugging Face files beside it. Returns the ONNX file."""
    out_dir = save_support_files(exported, out_dir)
    onnx_path = out_dir / "model.onnx"
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
    log.info("exported ONNX model with inputs %s to %s", names, onnx_path)
    return onnx_path


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
    out_dir = Path(cfg.get("out_dir") or Path(cfg.paths.output_dir) / default_name)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir='{out_dir}' is a file; give a directory to write into.")
    if cfg.get("ckpt_path"):
        exported = load_checkpoint(cfg.ckpt_path)
    else:
        exported = load_model_dir(cfg.model_dir)
    try:
        if cfg.format == "hf":
            path = save_hf(exported, out_dir)
            print(f"wrote Hugging Face model directory {path}")
            return {"format": "hf", "path": str(path)}
        onnx_path = export_onnx(exported, out_dir, cfg.opset)
    except OSError as error:
        raise ExportError(
            f"cannot write the export to out_dir='{out_dir}' ({error.strerror or error}); free "
            "disk space or give a writable out_dir=DIR."
        ) from error
    diff = onnx_max_abs_diff(exported, onnx_path)
    print(
        f"wrote {onnx_path}; max abs diff of start/end logits, onnxruntime vs PyTorch: {diff:.2e}"
    )
    if diff > cfg.atol:
        raise ExportError(
            f"the ONNX model's logits differ from PyTorch's by up to {diff:.2e}, more than "
            f"atol={cfg.atol}; try another opset, or raise atol if the difference is acceptable."
        )
    written = {"format": "onnx", "path": str(onnx_path), "max_abs_diff": diff}
    if recipe is None:
        return written
    try:
        return {**written, **quantize_export(exported, onnx_path, recipe, cfg)}
    except OSError as error:
        raise ExportError(
            f"cannot write the int8 export to out_dir='{out_dir}' ({error.strerror or error}); "
            "free disk space or give a writable out_dir=DIR."
        ) from error


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
