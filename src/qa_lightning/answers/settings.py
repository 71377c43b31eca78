"""The windowing and decoding a model answers with (:class:`InferenceSettings`), saved beside an
export in ``qa_lightning.json`` together with the manifest of the export's files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from qa_lightning.answers.decoding import REFERENCE_DECODING, decoding_problem
from qa_lightning.core.config import type_problem
from qa_lightning.core.errors import ConfigError
from qa_lightning.core.integrity import manifest_problems, write_atomic
from qa_lightning.data.windowing import windowing_problem

#: File in an exported model directory holding the windowing and decoding it was trained with,
#: and (under ``"files"``) the size and SHA-256 digest of every other file the export wrote.
SETTINGS_FILE = "qa_lightning.json"
THRESHOLD_FIX = (
    "must be a number (e.g. 0.0); best is resolved when a checkpoint is exported, from its last "
    "validation."
)


@dataclass(frozen=True)
class InferenceSettings:
    """Windowing (as ``data.*``) and decoding (as ``postprocess.*``) settings (reference
    defaults). With ``version_2_with_negative`` (SQuAD v2) a question is answered ``""`` when its
    null score beats its best span's score by more than ``null_score_diff_threshold``."""

    max_length: int = 384
    stride: int = 128
    max_question_tokens: int = 64
    n_best: int = REFERENCE_DECODING["n_best"]
    max_answer_length: int = REFERENCE_DECODING["max_answer_length"]
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = field(default=0.0, metadata={"fix": THRESHOLD_FIX})

    def __post_init__(self) -> None:
        problem = (
            type_problem(asdict(self), InferenceSettings)
            or windowing_problem(self.max_length, self.stride, self.max_question_tokens)
            or decoding_problem(self.n_best, self.max_answer_length)
        )
        if problem is None and not np.isfinite(self.null_score_diff_threshold):
            problem = ("null_score_diff_threshold", self.null_score_diff_threshold, THRESHOLD_FIX)
        if problem:
            key, value, fix = problem
            raise ConfigError(f"invalid setting {key}={value!r}: {fix}")

    @classmethod
    def from_dir(cls, directory: str | Path | None) -> InferenceSettings:
        """The settings saved in ``directory``/``SETTINGS_FILE``, else the defaults."""
        path = Path(directory) / SETTINGS_FILE if directory else None
        if path is None or not path.is_file():
            return cls()
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"'{path}' is not valid JSON ({error.msg}); re-export the model."
            ) from error
        if not isinstance(saved, dict):
            raise ConfigError(f"'{path}' is not a JSON object of settings; re-export the model.")
        try:
            return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        except ConfigError as error:
            raise ConfigError(f"'{path}': {error} Fix the file or re-export the model.") from error

    def updated(self, **overrides: float | None) -> InferenceSettings:
        """A copy with the overrides that are not ``None``."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def save(
        self,
        directory: str | Path,
        files: dict[str, dict] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the settings, with ``extra`` entries (e.g. ``quantization``) and the manifest
        ``files`` of the directory's other files."""
        saved: dict[str, Any] = {**asdict(self), **(extra or {})}
        if files is not None:
            saved["files"] = files
        return write_atomic(Path(directory) / SETTINGS_FILE, json.dumps(saved, indent=2) + "\n")


#: The settings' names: the command-line keys of ``predict`` and ``serve`` that override a model's.
SETTING_KEYS = tuple(f.name for f in fields(InferenceSettings))


def check_model_dir(directory: str | Path) -> None:
    """Raise a :class:`ConfigError` when a file listed in the directory's ``SETTINGS_FILE``
    manifest is missing or differs from what the export wrote (directories without a manifest,
    such as a hub model's, are not checked)."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ConfigError(
            f"'{path}' is damaged ({type(error).__name__}); export the model again: "
            "python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=hf."
        ) from error
    if files is None:
        return
    problems = manifest_problems(directory, files)
    if problems:
        raise ConfigError(
            f"the model directory '{directory}' is damaged or incomplete: {'; '.join(problems)} "
            f"(compared with the manifest in {SETTINGS_FILE}). Copy it again, or export the "
            "model again: python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt "
            "format=hf (or format=onnx)."
        )
