"""Reading checkpoints back: checked, then what they say about their model.

- :func:`load_checkpoint_file`: a checkpoint read back checked (intact, and loadable with
  ``torch.load(weights_only=True)``, the unpickler that cannot run code, unless the user trusts
  it: ``trust_checkpoint``, :func:`trust_setting`).
- :func:`checkpoint_model_source`, :func:`checkpoint_settings`, :func:`tuned_null_threshold`: the
  config and tokenizer a checkpoint rebuilds its model from, the windowing and decoding it was
  trained with, and the null threshold its last validation tuned.
- :func:`load_checkpoint` (and :func:`load_model_dir` for an exported directory): the trained
  Hugging Face model with its tokenizer and settings, for export, distillation and int8 checks.

Checkpoints are written by training (:mod:`qa_lightning.runs.checkpoint_writing`); this module
imports nothing of the entry points.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from qa_lightning.answers.config import NULL_THRESHOLD_BEST
from qa_lightning.answers.settings import InferenceSettings, check_model_dir
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.core.integrity import CHUNK
from qa_lightning.core.plain import plain
from qa_lightning.core.tokenizer import (
    check_tokenizer_fits,
    load_model_config,
    load_tokenizer,
    model_vocab_size,
)
from qa_lightning.model.files import CHECKPOINT_KEY as MODEL_FILES_KEY
from qa_lightning.model.files import has_config, has_tokenizer, write_model_files

log = logging.getLogger(__name__)


def trust_setting(cfg: Any) -> bool:
    """The ``trust_checkpoint`` key of an entry point's config (``false`` when absent), checked
    to be a boolean: a misspelt value must not trust a checkpoint."""
    value = cfg.get("trust_checkpoint", False)
    if not isinstance(value, bool):
        raise ConfigError(
            f"invalid config: trust_checkpoint={value!r}; use true (load a checkpoint that needs "
            "Python's full unpickler, which can run code: only for files you trust) or false."
        )
    return value


def load_checkpoint_file(path: str | Path, trust: bool = False) -> tuple[dict[str, Any], bool]:
    """A checkpoint file, memory-mapped and checked, and whether it loaded with
    ``weights_only=True``.

    Damage (a file cut short, or whose CRC-32 checksums do not match) is a :class:`ConfigError`
    naming the file. A checkpoint that the safe unpickler refuses (it holds other objects than
    tensors and plain values: an earlier version's, or a crafted one) is one too, unless
    ``trust``: then it is loaded with Python's full unpickler, which can run code, and a warning
    says so.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path='{path}' does not exist (resolved to '{path.resolve()}'); training runs "
            "keep theirs in <run dir>/checkpoints/."
        )
    damage = _zip_damage(path)
    if damage:
        raise ConfigError(
            f"ckpt_path='{path}' is damaged ({damage}): it was cut short or altered after it was "
            f"written. {_OTHER_CHECKPOINT}"
        )
    mmap = zipfile.is_zipfile(path)  # torch.save's format; older pickles cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), True
    except pickle.UnpicklingError as error:
        reason = _weights_only_refusal(error)
        if reason is None:
            raise _unreadable(path, error) from error
        if not trust:
            raise ConfigError(
                f"ckpt_path='{path}' can only be loaded with Python's full unpickler, which runs "
                f"any code stored in the file ({reason}). Checkpoints written by this version of "
                "qa_lightning load without it; this one is from an earlier version or from "
                "elsewhere. Load it only if you trust where it came from: add "
                "trust_checkpoint=true to the command."
            ) from error
    except Exception as error:  # zip, storage and torch errors come in many types
        raise _unreadable(path, error) from error
    log.warning(
        "trust_checkpoint=true: loading '%s' with Python's full unpickler (%s), which can run "
        "code stored in the file",
        path,
        reason,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap), False
    except Exception as error:
        raise _unreadable(path, error) from error


_OTHER_CHECKPOINT = (
    "Use another checkpoint (the run's checkpoints/best-*.ckpt or last.ckpt), copy it again, or "
    "train again."
)


def _unreadable(path: Path, error: BaseException) -> ConfigError:
    detail = _weights_unpickler_detail(error)
    if detail is None:
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else ""
    return ConfigError(
        f"ckpt_path='{path}' is not a readable PyTorch checkpoint ({type(error).__name__}: "
        f"{detail}); it may be cut short (an interrupted copy, a full disk) or not be a "
        f"checkpoint at all. {_OTHER_CHECKPOINT}"
    )


def _weights_unpickler_detail(error: BaseException) -> str | None:
    """The reason ``torch.load(weights_only=True)`` gives for refusing a file, if it is one."""
    text = str(error)
    if "WeightsUnpickler error:" not in text:
        return None
    lines = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
    return lines[0].split(" was not an allowed global")[0].strip() if lines else ""


def _weights_only_refusal(error: BaseException) -> str | None:
    """What ``torch.load(weights_only=True)`` refused to create (e.g. ``Unsupported global:
    GLOBAL numpy...``), or ``None`` when ``error`` is something else (a file that is no pickle,
    or a damaged one)."""
    detail = _weights_unpickler_detail(error) or ""
    if any(marker in detail for marker in ("GLOBAL", "allowlisted", "add_safe_globals")):
        return detail
    return None


def _zip_damage(path: Path) -> str | None:
    """The first member of the zip archive ``path`` (``torch.save``'s format) whose content does
    not match its CRC-32, or ``None``. Files that are no zip archive are left to ``torch.load``."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # written without a checksum
                    continue
                with archive.open(info) as member:
                    while member.read(CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


@dataclass
class Exported:
    """A model ready to export: the Hugging Face model (eval mode), tokenizer and settings."""

    model: torch.nn.Module
    tokenizer: Any
    settings: InferenceSettings


def read_checkpoint(ckpt_path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint of this project, memory-mapped, checked to be intact and loaded
    with ``weights_only=True`` (with ``trust``, a checkpoint that needs Python's full unpickler
    is loaded with it: see :func:`load_checkpoint_file`)."""
    return load_checkpoint_file(ckpt_path, trust)[0]


def check_resumable(checkpoint: dict[str, Any], ckpt_path: str | Path, key: str) -> None:
    """Training continues only from a checkpoint with the optimizer's state (``last.ckpt``);
    a best checkpoint holds the weights only (``save_weights_only``): a :class:`ConfigError`
    that says which to use instead (Lightning's own is a ``KeyError`` deep in ``fit``)."""
    if "optimizer_states" in checkpoint:
        return
    path = Path(ckpt_path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else "<run dir>"
    raise ConfigError(
        f"cannot continue training from '{ckpt_path}' ({key}): it holds the model's weights "
        "only (a best-*.ckpt: no optimizer, schedule or loop state). Continue the run from "
        f"its last checkpoint (resume=true hydra.run.dir={run_dir}, or "
        f"ckpt_path={run_dir}/checkpoints/last.ckpt), or start a new run from these weights: "
        f"model.name_or_path={run_dir}/hf_model model.from_scratch=false (the run's export of "
        f"its best checkpoint; python -m qa_lightning.export ckpt_path={ckpt_path} format=hf "
        "writes one)."
    )


def checkpoint_model_config(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """``name_or_path`` and ``config_overrides`` of the checkpoint's ``QAModule``: the config
    that builds its architecture. A student (``keep_layers``) is ``name_or_path``'s config with
    ``num_hidden_layers`` = the number of layers it kept; a narrowed one (``ffn_width``) with
    ``intermediate_size`` (DistilBERT: ``hidden_dim``) = ``ffn_width``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "name_or_path" not in hparams:
        raise ConfigError(
            f"ckpt_path='{ckpt_path}' is not a qa_lightning checkpoint (its hyperparameters have "
            "no name_or_path); give a checkpoint written by python -m qa_lightning.train."
        )
    overrides = plain(hparams.get("config_overrides"))
    if hparams.get("keep_layers") is not None:
        overrides = {**(overrides or {}), "num_hidden_layers": len(hparams["keep_layers"])}
    if hparams.get("ffn_width") is not None:
        from qa_lightning.model.width import size_key

        files = checkpoint.get(MODEL_FILES_KEY)
        if has_config(files):
            model_type = files["config"].get("model_type", "")
        else:  # the base's config file (no weights): which key holds the width
            purpose = "to rebuild its model.ffn_width"
            config = load_model_config(str(hparams["name_or_path"]), overrides, purpose)
            model_type = config.model_type
        overrides = {**(overrides or {}), size_key(model_type): int(hparams["ffn_width"])}
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
        if value is not None:  # an earlier version may hold NumPy scalars
            settings[field.name] = plain(value)
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
    from qa_lightning.model.loading import load_qa_model

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
    from qa_lightning.model.loading import load_qa_model

    if not Path(model_dir).is_dir():
        raise ConfigError(f"model_dir='{model_dir}' is not a directory.")
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    check_tokenizer_fits(tokenizer, model_dir, model_vocab_size(str(model_dir)), model_dir)
    return Exported(
        load_qa_model(str(model_dir), trained_head=True).eval(),
        tokenizer,
        InferenceSettings.from_dir(model_dir),
    )
