"""Questions from jsonl (a file or standard input) answered into jsonl: ``predict``'s input and
output. Bad lines are reported, never answered; the output is written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qa_lightning.core.errors import ConfigError, InputError
from qa_lightning.core.integrity import write_atomic
from qa_lightning.serving.answerer import QuestionAnswerer, text_problem

log = logging.getLogger(__name__)

#: ``input=-`` / ``output=-``: standard input / standard output instead of a file.
STDIO = "-"


# -- question files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionLine:
    """A question of a jsonl file: its 1-based line number, optional id, question and context."""

    line: int
    id: str | None
    question: str
    context: str


def read_input_text(path: str | Path) -> str:
    """The UTF-8 text of the file ``path``, or of standard input when ``path`` is ``-``."""
    if str(path) == STDIO:
        if sys.stdin.isatty():
            log.warning("reading jsonl questions from standard input (end with Ctrl-D)")
        data = sys.stdin.buffer.read()
    else:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(
                f"input='{path}' {what} (resolved to '{path.resolve()}'); give a jsonl file "
                'with one {"question": ..., "context": ...} object a line, or input=- to read '
                "them from standard input."
            )
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"input='{path}' is not valid UTF-8 (byte {error.start}); re-encode it as UTF-8."
        ) from error


def read_question_lines(path: str | Path) -> tuple[list[QuestionLine], list[tuple[int, str]]]:
    """Questions of a jsonl file, or of standard input for ``-`` (one ``{"question",
    "context", "id"?}`` object a line) and the problems of the lines that cannot be answered,
    as ``(line number, problem)``.

    Blank lines are ignored.
    """
    text = read_input_text(path)
    questions, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((number, f"not valid JSON ({error.msg}, column {error.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"a JSON {type(record).__name__}, not an object"))
            continue
        problem = text_problem("question", record.get("question")) or text_problem(
            "context", record.get("context")
        )
        if problem:
            problems.append((number, problem))
            continue
        qid = record.get("id")
        questions.append(
            QuestionLine(
                number, None if qid is None else str(qid), record["question"], record["context"]
            )
        )
    if not questions and len(problems) > 1 and (error := one_document(path, text)):
        raise error
    return questions, problems


def one_document(path: str | Path, text: str) -> InputError | None:
    """The error for ``text`` that is one JSON document over several lines (a SQuAD json file,
    say), not jsonl; ``None`` where it is not."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return InputError(
            f"input='{path}' is a SQuAD json file, not jsonl. evaluate answers every question "
            "of such a file, scores them and writes the answers by id to predictions.json: "
            f"python -m qa_lightning.evaluate <the same model key> data=local "
            f"data.validation_file={path}. predict reads one "
            '{"question": ..., "context": ...} object a line.'
        )
    return InputError(
        f"input='{path}' is one JSON {type(document).__name__} over {len(text.splitlines())} "
        'lines, not jsonl: write one {"question": ..., "context": ...} object a line.'
    )


def load_question_file(path: str | Path) -> tuple[list[QuestionLine], list[tuple[int, str]]]:
    """:func:`read_question_lines`, logging each bad line; a file with no answerable line is an
    :class:`InputError`."""
    questions, problems = read_question_lines(path)
    source = "standard input" if str(path) == STDIO else path
    for number, problem in problems:
        log.warning("%s line %d: %s; skipped", source, number, problem)
    if not questions:
        raise InputError(
            f"input='{path}' has no line that can be answered ({len(problems)} bad line(s)); "
            'each line must be a {"question": ..., "context": ...} object.'
        )
    return questions, problems


def answer_file(
    answerer: QuestionAnswerer,
    input_path: str | Path,
    output_path: str | Path,
    top_k: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer a jsonl file of questions into a jsonl file (see :func:`write_answers`)."""
    questions, problems = load_question_file(input_path)
    return write_answers(answerer, questions, problems, output_path, top_k, progress)


def write_answers(
    answerer: QuestionAnswerer,
    questions: Sequence[QuestionLine],
    problems: Sequence[tuple[int, str]],
    output_path: str | Path,
    top_k: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer questions into a jsonl file (standard output for ``-``), a line per input line:
    answered lines as ``{"line", "id", "question", "answers": [{"answer", "score", "start",
    "end"}]}``, bad lines as ``{"line", "error"}``. Returns a summary with the bad lines.

    A file is checked to be writable before any question is answered, and written with
    :func:`~qa_lightning.core.integrity.write_atomic`: an interrupted run leaves no half-written
    file.
    """
    summary = {
        "answered": len(questions),
        "bad_lines": [{"line": n, "problem": p} for n, p in problems],
        "output": str(output_path),
    }
    if str(output_path) == STDIO:
        rows = answer_rows(answerer, questions, problems, top_k, progress)
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return summary
    output_path = Path(output_path)
    probe = output_path.with_name(output_path.name + ".part")
    try:
        if output_path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        output_path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"cannot write output='{output_path}' ({error.strerror}); give a writable file "
            "path, e.g. output=answers.jsonl."
        ) from error
    rows = answer_rows(answerer, questions, problems, top_k, progress)
    try:
        write_atomic(
            output_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        )
    except OSError as error:
        raise ConfigError(
            f"cannot write output='{output_path}' ({error.strerror}); the answers could not be "
            "saved: free disk space or give another output=PATH, and run again."
        ) from error
    return summary


def answer_rows(
    answerer: QuestionAnswerer,
    questions: Sequence[QuestionLine],
    problems: Sequence[tuple[int, str]],
    top_k: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The output rows of :func:`write_answers`, in input line order."""
    answers = answerer.answer(
        [q.question for q in questions], [q.context for q in questions], top_k, progress
    )
    rows = [
        {
            "line": q.line,
            **({"id": q.id} if q.id is not None else {}),
            "question": q.question,
            "answers": [a.as_dict() for a in found],
        }
        for q, found in zip(questions, answers, strict=True)
    ]
    rows += [{"line": number, "error": problem} for number, problem in problems]
    rows.sort(key=lambda row: row["line"])
    return rows
