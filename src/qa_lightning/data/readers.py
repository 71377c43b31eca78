"""Readers: a local data file -> its question records, chosen by config (``data.reader``).

A reader is a function ``reader(path) -> records``; each record is a dict with ``id``,
``context``, ``question``, ``answers`` (``{"text": [...], "answer_start": [...]}`` or a list of
``{"text", "answer_start"}``; empty when unanswerable) and optionally ``title``.
:func:`qa_lightning.data.loading.load_local_file` types them into the examples' columns
(:data:`COLUMNS`) and :func:`qa_lightning.data.records.check_records` checks that every answer
is at its ``answer_start``. Config: ``conf/data/reader/*.yaml`` (``_partial_: true``), e.g.
``data/reader=mrqa``; docs/extending.md shows how to add a format.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from qa_lightning.core.errors import ConfigError, DataError

COLUMNS = ("id", "title", "context", "question", "answers")
#: A reader: path -> records with the fields of :data:`COLUMNS` (``title`` optional).
Reader = Callable[[Path], Iterable[Mapping[str, Any]]]
SQUAD_JSONL_LAYOUT = f"Each line of a .jsonl file is one record with fields {list(COLUMNS)}."
MRQA_LAYOUT = (
    'An MRQA file has a header line {"header": {...}}, then one context a line: {"context": ..., '
    '"qas": [{"qid", "question", "detected_answers": [{"text", "char_spans"}]}]}.'
)


def squad_json(path: Path) -> list[dict[str, Any]]:
    """The official SQuAD layout ``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``
    (``is_impossible`` questions get no answers), or a JSON list of records."""
    return _parse_json(path, _read_text(path))


def squad_jsonl(path: Path) -> list[dict[str, Any]]:
    """One record a line (blank lines skipped)."""
    return [record for _, record in _json_lines(path, _read_text(path), SQUAD_JSONL_LAYOUT)]


def squad_parquet(path: Path) -> list[dict[str, Any]]:
    """A parquet table of records."""
    return _read_parquet(path)


#: :func:`by_extension`'s readers.
FORMATS = {".json": squad_json, ".jsonl": squad_jsonl, ".parquet": squad_parquet}


def by_extension(path: Path) -> list[dict[str, Any]]:
    """The default reader: :func:`squad_json`, :func:`squad_jsonl` or :func:`squad_parquet` by
    the file's extension."""
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"data file '{path}' has an unsupported extension '{path.suffix}'; use one of "
            f"{sorted(FORMATS)} (SQuAD json layout, or records with fields {list(COLUMNS)}), or "
            "choose a reader for its format (e.g. data/reader=mrqa; docs/extending.md)."
        )
    return reader(path)


def mrqa_jsonl(path: Path) -> list[dict[str, Any]]:
    """An MRQA 2019 shared-task file (``.jsonl`` or ``.jsonl.gz``: NaturalQuestions, TriviaQA,
    NewsQA, SearchQA, HotpotQA ...): a header line, then one context a line with its ``qas``.

    The answers are the ``detected_answers``' character spans, which are inclusive: ``[start,
    end]`` is ``context[start : end + 1]``, one answer per span (an answer found twice in the
    context gives two), see :func:`mrqa_answers`. The raw ``answers`` (accepted answers, not
    necessarily in the context) are not used: scores are against the spans' texts.
    """
    records = []
    for number, line in _json_lines(path, _read_text(path), MRQA_LAYOUT):
        if isinstance(line, dict) and "header" in line and "context" not in line:
            continue
        try:
            context = line["context"]
            for qa in line["qas"]:
                records.append(
                    {
                        "id": qa["qid"],
                        "title": "",
                        "context": context,
                        "question": qa["question"],
                        "answers": mrqa_answers(context, qa.get("detected_answers") or []),
                    }
                )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"data file '{path}' line {number}: not an MRQA context ({type(error).__name__}: "
                f"{error}). {MRQA_LAYOUT}"
            ) from error
    return records


def mrqa_answers(context: str, detected_answers: list[dict[str, Any]]) -> dict[str, list]:
    """SQuAD answers of MRQA ``detected_answers``: for each inclusive char span ``[start, end]``,
    the text ``context[start : end + 1]`` at ``start``, duplicates dropped.

    The span's text is the answer when it is the detected ``text`` up to case (which some subsets
    lower-case, e.g. TriviaQA). Otherwise the span is wrong: the detected text is kept at
    ``start``, where the record check finds it (its end was wrong) or lists the question by id.
    """
    answers: dict[tuple[str, int], None] = {}
    for detected in detected_answers:
        text = str(detected["text"]).strip()
        for start, end in detected["char_spans"]:
            span = context[start : end + 1] if 0 <= start <= end < len(context) else ""
            answers[(span if span.casefold() == text.casefold() else text, int(start))] = None
    return {"text": [text for text, _ in answers], "answer_start": [s for _, s in answers]}


def _read_text(path: Path) -> str:
    """The file's UTF-8 text; ``.gz`` files are decompressed."""
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as file:
                return file.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file '{path}' is not valid UTF-8 (byte {error.start}: "
            f"{error.object[error.start : error.start + 4]!r}). Re-encode it as UTF-8."
        ) from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"data file '{path}' is not a readable gzip file ({error}).") from error
    except OSError as error:
        raise ConfigError(f"cannot read data file '{path}': {error.strerror}.") from error


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"data file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column "
            f"{error.colno}. A .json file holds the official SQuAD layout "
            '{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}; '
            "use .jsonl for one record per line."
        ) from error
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        return _flatten_squad(path, content["data"])
    if isinstance(content, list):
        return content
    raise DataError(
        f"data file '{path}' is JSON but not in the SQuAD layout: expected an object with a "
        '"data" list of articles, or a list of records with fields ' + str(list(COLUMNS)) + "."
    )


def _flatten_squad(path: Path, articles: list[Any]) -> list[dict[str, Any]]:
    records = []
    for a, article in enumerate(articles):
        try:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    records.append(
                        {
                            "id": qa["id"],
                            "title": article.get("title", ""),
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": [] if qa.get("is_impossible") else qa["answers"],
                        }
                    )
        except (KeyError, TypeError) as error:
            raise DataError(
                f"data file '{path}': article {a} ('{_title(article)}') lacks field {error} of "
                "the SQuAD layout (articles have 'paragraphs', paragraphs 'context' and 'qas', "
                "questions 'id', 'question' and 'answers')."
            ) from error
    return records


def _title(article: Any) -> str:
    return article.get("title", "?") if isinstance(article, dict) else "?"


def _json_lines(path: Path, text: str, layout: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line; ``layout`` says what a line holds."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"data file '{path}' line {number} is not valid JSON ({error.msg}, column "
                f"{error.colno}). {layout}"
            ) from error


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"data file '{path}' is not a readable parquet file: {error}.") from error
