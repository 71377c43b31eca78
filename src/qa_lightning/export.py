"""Export a trained checkpoint for serving: a Hugging Face directory or an ONNX model.

    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=hf
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx
    python -m qa_lightning.export model_dir=RUN/hf_model format=onnx
    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx quantize=int8

The command checks its config (``conf/export.yaml``) and hands the work to
:mod:`qa_lightning.serving.exports` (the directories and their checks) and
:mod:`qa_lightning.serving.int8` (the int8 recipe).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lightning.cli import hydra_main, quiet_output, report_errors
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.runs.checkpoint_reading import (
    load_checkpoint,
    load_model_dir,
    trust_setting,
)
from qa_lightning.serving.exports import check_out_dir, export_checked_onnx, save_hf
from qa_lightning.serving.int8 import check_quantize_config, quantize_export
from qa_lightning.serving.model_keys import given_model

FORMATS = ("hf", "onnx")
#: The model keys export takes (conf/model_keys.yaml): an ONNX export is exported already.
EXPORTABLE = ("model_dir", "ckpt_path")


def export(cfg: DictConfig) -> dict[str, Any]:
    """Run an export as configured in ``conf/export.yaml``; returns what was written."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"invalid config: format={cfg.format!r}; use one of {list(FORMATS)}.")
    if cfg.format == "hf" and cfg.get("model_dir") and not cfg.get("ckpt_path"):
        raise ConfigError("format=hf exports a checkpoint: give ckpt_path=PATH, not model_dir.")
    model = given_model(cfg, EXPORTABLE)
    if cfg.format == "onnx":
        _check_onnx_config(cfg)
    recipe = check_quantize_config(cfg)
    default_name = f"{cfg.format}_{cfg.quantize}_model" if recipe else f"{cfg.format}_model"
    out_dir = check_out_dir(cfg.get("out_dir") or Path(cfg.paths.output_dir) / default_name)
    if model.key == "ckpt_path":
        exported = load_checkpoint(model.path, trust_setting(cfg))
    else:
        exported = load_model_dir(model.path)
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
    checked = " (of the fp32 graph traced before fusion and quantisation)" if recipe else ""
    print(
        f"wrote {onnx_path}; max abs diff of start/end logits, onnxruntime vs PyTorch: "
        f"{diff:.2e}{checked}"
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


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    quiet_output(cfg)
    report_errors(lambda: export(cfg))


if __name__ == "__main__":
    main()
