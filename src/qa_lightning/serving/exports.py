"""A trained model written for serving (``python -m qa_lightning.export``): a Hugging Face
directory or an ONNX model.

A Hugging Face directory holds ``model.safetensors``, ``config.json``, the tokenizer and
``qa_lightning.json`` (the windowing and decoding the model was trained with, which
``qa_lightning.predict`` uses, and the size and SHA-256 digest of every other file, checked when
the directory is loaded). An ONNX directory holds ``model.onnx`` (checked against PyTorch
with onnxruntime) with the same files but the weights; with ``quantize=int8`` its ``model.onnx`` is
quantised to int8 (see :mod:`qa_lightning.serving.int8`). A directory is written whole or not at all
(:func:`~qa_lightning.core.integrity.staged_directory`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qa_lightning.answers.settings import SETTINGS_FILE
from qa_lightning.core.config import register_resolvers
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.core.integrity import file_manifest, staged_directory, writing
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.model.logits import OUTPUT_NAMES
from qa_lightning.runs.checkpoint_reading import (
    Exported,
    load_checkpoint,
)

log = logging.getLogger(__name__)
register_resolvers()

#: What a full disk leaves of an export (see :func:`~qa_lightning.core.integrity.writing`).
KEPT = "an export is staged beside out_dir and put in place whole, so nothing of it was left."


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
    with writing(out_dir, "the export", KEPT), staged_directory(out_dir) as staging:
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
    with writing(out_dir, "the export", KEPT), staged_directory(out_dir) as staging:
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
        with warnings.catch_warnings(), _eager_attention(exported.model):
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


@contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model with Transformers' eager attention (matmul, softmax, matmul) while it is traced:
    onnxruntime's transformer optimiser fuses that pattern into its ``Attention`` operator, and
    onnxruntime runs it faster than the traced ``scaled_dot_product_attention`` graph, whose mask
    handling it cannot fuse (docs/int8.md). The logits are the same up to float rounding."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def onnx_max_abs_diff(exported: Exported, onnx_path: str | Path) -> float:
    """Largest absolute difference between the start/end logits of onnxruntime and PyTorch on
    batches whose shapes differ from the traced one (padded and unpadded)."""
    from qa_lightning.model.logits import OnnxLogits

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
