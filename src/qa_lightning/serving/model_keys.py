"""The model keys of ``predict``, ``evaluate``, ``export`` and ``serve`` (``conf/model_keys.yaml``):
exactly one of ``model_dir`` (a Hugging Face directory), ``ckpt_path`` (a training checkpoint) or
``onnx_path`` (an ONNX export, whose tokenizer's directory ``model_dir`` may name); the backend
follows from the key given.

:func:`given_model` checks them before anything loads, naming the right key for the common
mix-ups: a run dir (its ``hf_model/``), a checkpoint, an ONNX export or a Hugging Face directory
under another key, a directory of checkpoints. :func:`load_answerer` loads the model it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qa_lightning.core.errors import ConfigError

if TYPE_CHECKING:
    from qa_lightning.serving.answerer import QuestionAnswerer

log = logging.getLogger(__name__)
#: The keys, in the order the messages name them, and what each names.
MODEL_KEYS = {
    "model_dir": "a Hugging Face model directory such as a training run's hf_model/",
    "ckpt_path": "a training checkpoint such as RUN/checkpoints/best-....ckpt",
    "onnx_path": "an ONNX export such as outputs/export/RUN/onnx_model",
}
#: The directories in a run dir (training's, or export's) that hold a model, by key.
RUN_DIR_MODELS = {
    "model_dir": ("hf_model",),
    "ckpt_path": ("checkpoints",),
    "onnx_path": ("onnx_model", "onnx_int8_model"),
}


@dataclass(frozen=True)
class GivenModel:
    """The model an entry point was given: ``key`` (``model_dir``, ``ckpt_path`` or
    ``onnx_path``) names ``path``; ``tokenizer_dir`` is a ``model_dir`` given beside an
    ``onnx_path`` (by default, the tokenizer beside the ONNX file)."""

    key: str
    path: Path
    tokenizer_dir: Path | None = None

    @property
    def backend(self) -> str:
        """``onnx`` (onnxruntime, ``onnx_path``) or ``torch`` (``model_dir``, ``ckpt_path``)."""
        return "onnx" if self.key == "onnx_path" else "torch"

    def as_keys(self) -> dict[str, str | None]:
        """``model_dir``, ``ckpt_path`` and ``onnx_path`` as strings (``None`` if not given)."""
        paths = {key: None for key in MODEL_KEYS} | {"model_dir": self.tokenizer_dir}
        paths[self.key] = self.path
        return {key: str(path) if path is not None else None for key, path in paths.items()}


def given_model(cfg: Mapping[str, Any], accepted: Sequence[str] = tuple(MODEL_KEYS)) -> GivenModel:
    """The model that ``cfg``'s keys name, checked: exactly one of the ``accepted`` keys (a
    ``model_dir`` beside an ``onnx_path`` names its tokenizer), its path of the kind the key
    takes; else a :class:`ConfigError` naming the key to use."""
    values = {key: cfg.get(key) for key in MODEL_KEYS}
    for key in MODEL_KEYS:
        if values[key] and key not in accepted:
            raise ConfigError(
                f"{key}='{values[key]}' names {what(key)}, which this command does not take: "
                f"give {takes(accepted)}."
            )
    named = [k for k in MODEL_KEYS if values[k] and not (k == "model_dir" and values["onnx_path"])]
    if len(named) != 1:
        choices = [f"{key}=PATH ({MODEL_KEYS[key]})" for key in MODEL_KEYS if key in accepted]
        got = ", ".join(f"{key}={values[key]}" for key in named)
        beside = "; model_dir may name the tokenizer's directory of onnx_path"
        raise ConfigError(
            f"give exactly one of {', '.join(choices[:-1])} or {choices[-1]}"
            + (f"; got {got}" if got else "")
            + (beside if "onnx_path" in accepted else "")
            + "."
        )
    key = named[0]
    model = GivenModel(key, Path(str(values[key])))
    problem = path_problem(key, model.path, accepted)
    if key == "onnx_path" and values["model_dir"]:
        model = GivenModel(key, model.path, Path(str(values["model_dir"])))
        problem = problem or path_problem("model_dir", model.tokenizer_dir, accepted, "onnx_path")
    if problem:
        raise ConfigError(problem)
    return model


def path_kind(path: Path) -> str:
    """What ``path`` holds: ``missing``; ``ckpt_path`` (a ``.ckpt`` file), ``onnx_path`` (a
    ``.onnx`` file, or a directory holding ``model.onnx`` and no PyTorch weights),
    ``model_dir`` (a directory holding ``config.json``); ``run`` (a directory holding a model
    directory or ``checkpoints/``), ``checkpoints`` (a directory of ``.ckpt`` files); else
    ``file`` or ``directory``."""
    if path.is_file():
        return {".ckpt": "ckpt_path", ".onnx": "onnx_path"}.get(path.suffix, "file")
    if not path.is_dir():
        return "missing"
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if (path / "model.onnx").is_file() and not weights:
        return "onnx_path"
    if (path / "config.json").is_file():
        return "model_dir"
    if any((path / name).is_dir() for names in RUN_DIR_MODELS.values() for name in names):
        return "run"
    return "checkpoints" if any(path.glob("*.ckpt")) else "directory"


def path_problem(
    key: str, path: Path, accepted: Sequence[str], beside: str | None = None
) -> str | None:
    """What is wrong with ``key``'s ``path``, naming the key it needs (for a run dir, its
    models), or ``None``. Missing paths of ``ckpt_path`` and ``onnx_path`` are left to their
    loaders. ``beside``: the key a ``model_dir`` names the tokenizer of (``onnx_path``)."""
    kind = path_kind(path)
    if kind == key or (beside and kind == "onnx_path"):
        return None
    where, wanted = f"{key}='{path}'", what(key)
    if kind in MODEL_KEYS:  # a model under another key
        if kind not in accepted:
            return (
                f"{where} is {what(kind)}, which this command does not take: give "
                f"{takes(accepted)}."
            )
        return f"{where} is {what(kind)}, not {wanted}: give {kind}={path}."
    found = run_dir_models(path, list(dict.fromkeys([key, *accepted]))) if kind == "run" else []
    if found:
        return f"{where} is a run dir, not {wanted}; its model: {' or '.join(found)}."
    if kind == "checkpoints" and "ckpt_path" in accepted:
        return f"{where} is a directory of checkpoints: give one of them, {checkpoint_in(path)}."
    if key == "model_dir" and kind == "missing":
        return (
            f"{where} is not a directory (resolved to '{path.resolve()}'); give "
            f"{MODEL_KEYS['model_dir']}."
        )
    if key == "model_dir":
        names = sorted(p.name for p in path.iterdir())[:10] if kind != "file" else []
        holds = "a file" if kind == "file" else f"no config.json; it holds: {', '.join(names)}"
        return (
            f"{where} is not {wanted} ({holds}); give {MODEL_KEYS['model_dir']}, or export one: "
            "python -m qa_lightning.export ckpt_path=... format=hf."
        )
    if key == "ckpt_path" and kind not in ("missing", "file"):
        return f"{where} is a directory, not {wanted}: give {MODEL_KEYS['ckpt_path']}."
    return None


def takes(accepted: Sequence[str]) -> str:
    """``model_dir=PATH (a Hugging Face ...) or ckpt_path=PATH (...)``."""
    return " or ".join(f"{key}=PATH ({MODEL_KEYS[key]})" for key in accepted)


def what(key: str) -> str:
    """What ``key`` names, without the example: ``a training checkpoint``."""
    return MODEL_KEYS[key].split(" such as ")[0]


def run_dir_models(run_dir: Path, keys: Sequence[str]) -> list[str]:
    """``key=PATH`` for each model a run dir holds that one of ``keys`` takes, in their order:
    ``hf_model/``, the best checkpoint, ONNX exports."""
    found = []
    for key in keys:
        for name in RUN_DIR_MODELS.get(key, ()):
            if not (run_dir / name).is_dir():
                continue
            if key == "ckpt_path":
                if any((run_dir / name).glob("*.ckpt")):
                    found.append(checkpoint_in(run_dir / name))
            else:
                found.append(f"{key}={run_dir / name}")
    return found


def checkpoint_in(directory: Path) -> str:
    """``ckpt_path=`` of the checkpoint to take from a ``checkpoints/`` directory: the best
    (the last ``best*.ckpt`` by name), else ``last.ckpt``, else the last by name."""
    best = sorted(directory.glob("best*.ckpt"))
    last = directory / "last.ckpt"
    chosen = best[-1] if best else last if last.is_file() else sorted(directory.glob("*.ckpt"))[-1]
    return f"ckpt_path={chosen}"


def check_onnx_precision(model: GivenModel, precision: str) -> None:
    """An ONNX export runs in its own precision: ``precision`` must be ``auto`` or ``32-true``."""
    if model.backend == "onnx" and precision not in ("auto", "32-true"):
        raise ConfigError(
            f"invalid config: precision={precision!r} with onnx_path, which runs the exported "
            "model in its own precision (fp32, or int8 for quantize=int8 exports); precision "
            "applies to model_dir and ckpt_path."
        )


def load_answerer(
    model: GivenModel,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "auto",
    trust_checkpoint: bool = False,
    **settings: Any,
) -> QuestionAnswerer:
    """The :class:`QuestionAnswerer` of ``model``: PyTorch on ``device`` in ``precision`` for a
    ``model_dir`` or ``ckpt_path`` (a checkpoint's embedded model, tokenizer and settings),
    onnxruntime for an ``onnx_path``. ``settings`` that are not ``None`` replace the model's.
    (Its imports are here: the server's HTTP process checks the keys and holds no torch.)"""
    from qa_lightning.model.logits import TorchLogits, resolve_device, resolve_precision
    from qa_lightning.runs.checkpoint_reading import load_checkpoint
    from qa_lightning.serving.answerer import QuestionAnswerer

    check_onnx_precision(model, precision)
    if model.key == "onnx_path":
        return QuestionAnswerer.from_onnx(model.path, model.tokenizer_dir, batch_size, **settings)
    if model.key == "model_dir":
        return QuestionAnswerer.from_model_dir(
            model.path, device, batch_size, precision, **settings
        )
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    exported = load_checkpoint(model.path, trust_checkpoint)
    log.info("answering with PyTorch on %s in %s", device, precision)
    logits_fn = TorchLogits(exported.model, device, precision, pack=True)
    return QuestionAnswerer(
        exported.tokenizer,
        logits_fn,
        exported.settings.updated(**settings),
        batch_size,
        equal_length=logits_fn.device.type == "cpu",
    )
