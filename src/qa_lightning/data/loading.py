"""Load SQuAD-format examples from the Hugging Face hub or local files (read by a reader of
:mod:`qa_lightning.data.readers`: SQuAD json, jsonl, parquet, MRQA jsonl, or your own).

Every loader returns a ``datasets.Dataset`` with columns ``id``, ``title``, ``context``,
``question`` and ``answers`` (``{"text": [str], "answer_start": [int]}``; empty for SQuAD v2
unanswerable questions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from qa_lightning.core.errors import ConfigError, DataError
from qa_lightning.data.readers import COLUMNS, Reader, by_extension

REQUIRED_FIELDS = ("id", "context", "question", "answers")


def load_hub_split(dataset_name: str, dataset_config: str | None, split: str) -> datasets.Dataset:
    """One split of a SQuAD-format hub dataset (e.g. ``squad``, ``squad_v2``)."""
    try:
        examples = datasets.load_dataset(dataset_name, dataset_config, split=split)
    except Exception as error:  # the hub raises many types: connection, missing repo, auth
        raise ConfigError(
            f"could not load split '{split}' of dataset '{dataset_name}' from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Without network access, train on local SQuAD-format files instead: "
            "data=local data.train_file=PATH data.validation_file=PATH (json, jsonl or parquet), "
            "and use a local model such as model=minilm."
        ) from error
    missing = [c for c in REQUIRED_FIELDS if c not in examples.column_names]
    if missing:
        raise DataError(
            f"hub dataset '{dataset_name}' has no column(s) {missing}; a SQuAD-format dataset "
            f"has columns {list(COLUMNS)}. Set data.dataset_name to a SQuAD-format dataset."
        )
    if "title" not in examples.column_names:
        examples = examples.add_column("title", [""] * len(examples))
    return examples.select_columns(list(COLUMNS))


def load_local_file(path: str | Path, reader: Reader | None = None) -> datasets.Dataset:
    """Examples of a local file, read by ``reader`` (``data.reader``; default
    :func:`~qa_lightning.data.readers.by_extension`: SQuAD .json, .jsonl or .parquet)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"data file '{path}' does not exist (resolved to '{path.resolve()}'). "
            "Check data.train_file / data.validation_file; relative paths are relative to the "
            "directory you run from."
        )
    if not path.is_file():
        raise ConfigError(
            f"data file '{path}' is a directory, not a file; give the SQuAD json, jsonl or "
            "parquet file in it (data.train_file / data.validation_file)."
        )
    examples = _to_dataset(path, (reader or by_extension)(path))
    if not len(examples):
        function = getattr(reader, "func", reader) or by_extension  # Hydra gives a partial
        name = getattr(function, "__name__", type(function).__name__)
        raise DataError(
            f"data file '{path}' holds no questions: the reader ({name}, data.reader) yielded "
            "no records. Check that the file is not empty and that data.reader reads its format "
            "(SQuAD json, jsonl or parquet by default)."
        )
    return examples


def _normalise_answers(answers: Any) -> dict[str, list]:
    """Accept ``{"text": [...], "answer_start": [...]}`` or ``[{"text", "answer_start"}, ...]``."""
    if isinstance(answers, dict):
        texts, starts = list(answers["text"]), list(answers["answer_start"])
    else:
        texts = [a["text"] for a in answers]
        starts = [a["answer_start"] for a in answers]
    if len(texts) != len(starts):
        raise ValueError("answers have different numbers of 'text' and 'answer_start'")
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _to_dataset(path: Path, records: list[Any]) -> datasets.Dataset:
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    for position, record in enumerate(records):
        name = record.get("id", f"#{position}") if isinstance(record, dict) else f"#{position}"
        if not isinstance(record, dict):
            raise DataError(f"data file '{path}': record {position} is not an object.")
        missing = [f for f in REQUIRED_FIELDS if record.get(f) is None]
        if missing:
            raise DataError(
                f"data file '{path}': record '{name}' (position {position}) lacks field(s) "
                f"{missing}; every record needs {list(REQUIRED_FIELDS)}."
            )
        try:
            answers = _normalise_answers(record["answers"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"data file '{path}': record '{name}' has malformed answers ({error}); expected "
                '{"text": [...], "answer_start": [...]} or [{"text": ..., "answer_start": ...}].'
            ) from error
        columns["id"].append(str(record["id"]))
        columns["title"].append(str(record.get("title") or ""))
        columns["context"].append(str(record["context"]))
        columns["question"].append(str(record["question"]))
        columns["answers"].append(answers)
    features = datasets.Features(
        id=datasets.Value("string"),
        title=datasets.Value("string"),
        context=datasets.Value("string"),
        question=datasets.Value("string"),
        answers={
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    )
    return datasets.Dataset.from_dict(columns, features=features)
