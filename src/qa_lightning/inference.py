"""Answer (question, context) pairs with a trained model: the windowing and span decoding of
training and evaluation, ranked into the ``top_k`` answers of each question with probabilities.

A question's candidates are the ``n_best`` best spans of each of its windows
(:func:`~qa_lightning.postprocess.best_window_spans`); the same span found in overlapping windows
is kept once with its best score; the ``n_best`` best candidates are turned into probabilities by a
softmax over their scores (``start_logit + end_logit``), as ``utils_qa.py`` does. The best answer
is therefore the one evaluation scores. A SQuAD v2 model (``version_2_with_negative`` in its
settings) also has the null answer ``""`` among its candidates (see :func:`rank_answers`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from qa_lightning.config import auto_precision, type_problem
from qa_lightning.data.collate import MODEL_INPUTS, WindowCollator
from qa_lightning.data.sampling import sorted_batches
from qa_lightning.data.windowing import make_eval_windows, truncate_questions, windowing_problem
from qa_lightning.errors import ConfigError, InputError
from qa_lightning.hardware import cpu_bf16_warning, cpu_int8_warning
from qa_lightning.integrity import manifest_problems, write_atomic
from qa_lightning.postprocess import (
    REFERENCE_DECODING,
    best_window_spans,
    decoding_problem,
    example_null_scores,
)
from qa_lightning.tokenizer import check_tokenizer_fits, load_tokenizer, model_vocab_size

log = logging.getLogger(__name__)

#: File in an exported model directory holding the windowing and decoding it was trained with,
#: and (under ``"files"``) the size and SHA-256 digest of every other file the export wrote.
SETTINGS_FILE = "qa_lightning.json"
OUTPUT_NAMES = ("start_logits", "end_logits")
#: Metadata key of a quantised ONNX model: its recipe as JSON (see :mod:`qa_lightning.quantize`).
QUANTIZATION_METADATA_KEY = "qa_lightning.quantization"
#: Questions windowed together, in ``batch_size`` units: their windows are batched sorted by
#: length (as evaluation does), so that short windows are not padded to long ones.
CHUNK_BATCHES = 16
#: ``precision`` of the PyTorch backend -> autocast dtype (``None``: fp32), as Lightning names them.
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: ``input=-`` / ``output=-``: standard input / standard output instead of a file.
STDIO = "-"
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


@dataclass(frozen=True)
class Answer:
    """A span of the context: ``context[start:end] == text``; ``score`` is its probability."""

    text: str
    score: float
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        """The keys of the ``question-answering`` pipeline: answer, score, start, end."""
        return {"answer": self.text, "score": self.score, "start": self.start, "end": self.end}


class LogitsFn(Protocol):
    """A model: a collated batch of windows -> ``(start_logits, end_logits)`` on the CPU."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchLogits:
    """An ``AutoModelForQuestionAnswering`` run with PyTorch, in fp32 or under autocast
    (``precision``: a key of :data:`AUTOCAST_DTYPES`)."""

    def __init__(
        self, model: torch.nn.Module, device: str = "cpu", precision: str = "32-true"
    ) -> None:
        self.device = torch.device(device)
        self.dtype = AUTOCAST_DTYPES[precision]
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
            outputs = self.model(**inputs)
        return outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu()


class OnnxLogits:
    """An ONNX export (see :mod:`qa_lightning.export`) run with onnxruntime."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(
                "the ONNX backend needs onnxruntime: pip install 'qa-lightning[export]' "
                "(or use backend=torch with model_dir=PATH)."
            ) from error
        try:
            self.session = onnxruntime.InferenceSession(
                str(onnx_path), providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ConfigError(
                f"onnx_path='{onnx_path}' is not a model onnxruntime can load "
                f"({type(error).__name__}: {str(error).strip()[:200]}); export it again with "
                "python -m qa_lightning.export ckpt_path=... format=onnx."
            ) from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        quantization = metadata.get(QUANTIZATION_METADATA_KEY)
        #: the recipe of a quantised export (``None``: fp32)
        self.quantization = json.loads(quantization) if quantization else None
        if self.quantization and (warning := cpu_int8_warning(f"onnx_path='{onnx_path}' (int8)")):
            log.warning(warning)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise ConfigError(
                f"the ONNX model needs input(s) {missing} that its tokenizer does not produce; "
                "export the ONNX model from the same model directory as the tokenizer."
            )
        feeds = {name: batch[name].numpy() for name in self.input_names}
        start_logits, end_logits = self.session.run(list(OUTPUT_NAMES), feeds)
        return torch.from_numpy(start_logits).float(), torch.from_numpy(end_logits).float()


def resolve_device(device: str) -> str:
    """``auto``: the GPU when there is one, else the CPU; other values are checked to name a
    device torch knows and that this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"invalid config: device={device!r} is not a torch device; use auto, cpu, cuda or "
            "cuda:N."
        ) from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but this machine has no CUDA GPU that torch can use; use "
            "device=cpu (or device=auto)."
        )
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: what training defaults to on ``device`` (bf16-mixed on GPUs and on CPUs with
    native bf16, else fp32); other values are checked against :data:`AUTOCAST_DTYPES`."""
    if precision == "auto":
        return auto_precision(device)
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"invalid config: precision={precision!r}; use auto, {', '.join(AUTOCAST_DTYPES)}."
        )
    if warning := cpu_bf16_warning(torch.device(device).type, precision, "precision", "32-true"):
        log.warning(warning)
    return precision


def check_inputs(questions: Sequence[str], contexts: Sequence[str]) -> None:
    """Raise :class:`InputError` for a missing, empty or whitespace-only question or context."""
    if len(questions) != len(contexts):
        raise InputError(f"{len(questions)} questions but {len(contexts)} contexts.")
    for i, (question, context) in enumerate(zip(questions, contexts, strict=True)):
        for name, value in (("question", question), ("context", context)):
            problem = text_problem(name, value)
            if problem:
                where = f" (pair {i})" if len(questions) > 1 else ""
                raise InputError(f"{problem}{where}; give a non-empty {name}.")


def text_problem(name: str, value: Any) -> str | None:
    """What is wrong with a question or context value, or ``None``."""
    if value is None:
        return f"the {name} is missing"
    if not isinstance(value, str):
        return f"the {name} is a {type(value).__name__}, not a string"
    if not value.strip():
        return f"the {name} is empty" if not value else f"the {name} is only whitespace"
    return None


def rank_answers(
    context: str,
    scores: np.ndarray,
    start_chars: np.ndarray,
    end_chars: np.ndarray,
    n_best: int = 20,
    top_k: int = 1,
    null_score: float | None = None,
    null_score_diff_threshold: float = 0.0,
) -> list[Answer]:
    """The ``top_k`` best of one question's window candidates, best first.

    Identical spans (from overlapping windows) are merged keeping their best score; probabilities
    are a softmax over the scores of the ``n_best`` best distinct spans. Candidates with score
    ``-inf`` are invalid and dropped; no valid candidate gives ``[]``.

    With a ``null_score`` (SQuAD v2: the question's smallest CLS start + end logit over its
    windows) the null answer ``""`` (``start == end == 0``) is a candidate too, as in
    ``utils_qa.py``: it takes part in the softmax even when it is not among the ``n_best`` best.
    It ranks above the spans that it beats by more than ``null_score_diff_threshold``, so it is
    the best answer exactly when evaluation predicts ``""``; at threshold 0 the answers are
    ranked by probability, as the question-answering pipeline ranks them with
    ``handle_impossible_answer``.
    """
    best: dict[tuple[int, int], float] = {}
    for score, start, end in zip(
        scores.tolist(), start_chars.tolist(), end_chars.tolist(), strict=True
    ):
        if np.isfinite(score) and score > best.get((start, end), -np.inf):
            best[(start, end)] = score
    # (start, end, score, is_null)
    candidates = [(int(start), int(end), score, False) for (start, end), score in best.items()]
    null = (0, 0, float(null_score), True) if null_score is not None else None
    kept = sorted([*candidates, *([null] if null else [])], key=lambda c: -c[2])[:n_best]
    if null and null not in kept:
        kept.append(null)
    if not kept:
        return []
    values = np.array([c[2] for c in kept], dtype=np.float64)
    probabilities = np.exp(values - values.max())
    probabilities /= probabilities.sum()
    # the null answer competes with its score lowered by the threshold, and loses ties
    order = sorted(
        range(len(kept)),
        key=lambda i: (
            -(kept[i][2] - (null_score_diff_threshold if kept[i][3] else 0.0)),
            kept[i][3],
        ),
    )
    return [
        Answer(context[kept[i][0] : kept[i][1]], float(probabilities[i]), kept[i][0], kept[i][1])
        for i in order[:top_k]
    ]


class QuestionAnswerer:
    """Tokenizer + model -> answers, with the windowing and decoding of training.

    ``answer(questions, contexts, top_k)`` returns, per question, up to ``top_k`` answers, best
    first. Build one with :meth:`from_model_dir` (PyTorch) or :meth:`from_onnx` (onnxruntime).
    Windows are batched sorted by length as in evaluation; ``equal_length`` (for CPUs) batches
    windows of one length only, unpadded (see :func:`~qa_lightning.data.sampling.sorted_batches`).
    """

    def __init__(
        self,
        tokenizer: Any,
        logits_fn: LogitsFn,
        settings: InferenceSettings | None = None,
        batch_size: int = 32,
        equal_length: bool = True,
    ) -> None:
        _check_batch_size(batch_size)
        self.tokenizer = tokenizer
        self.logits_fn = logits_fn
        self.settings = settings or InferenceSettings()
        self.batch_size = batch_size
        self.equal_length = equal_length
        self.collator = WindowCollator(tokenizer.pad_token_id, None if equal_length else 8)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        device: str = "auto",
        batch_size: int = 32,
        precision: str = "auto",
        **settings: float | None,
    ) -> QuestionAnswerer:
        """A Hugging Face model directory (e.g. a training run's ``hf_model/``) run with PyTorch
        on ``device`` in ``precision`` (see :func:`resolve_precision`).

        ``settings`` that are ``None`` come from the directory's ``qa_lightning.json``.
        """
        from qa_lightning.model import load_qa_model

        model_dir = _existing_dir(model_dir, "model_dir")
        _check_batch_size(batch_size)
        check_model_dir(model_dir)
        inference_settings = InferenceSettings.from_dir(model_dir).updated(**settings)
        device = resolve_device(device)  # all checks before the model is loaded
        precision = resolve_precision(precision, device)
        tokenizer = load_tokenizer(str(model_dir))
        check_tokenizer_fits(tokenizer, model_dir, model_vocab_size(str(model_dir)), model_dir)
        log.info("answering with PyTorch on %s in %s", device, precision)
        model = load_qa_model(str(model_dir))
        logits_fn = TorchLogits(model, device, precision)
        on_cpu = logits_fn.device.type == "cpu"
        return cls(tokenizer, logits_fn, inference_settings, batch_size, equal_length=on_cpu)

    @classmethod
    def from_onnx(
        cls,
        onnx_path: str | Path,
        tokenizer_dir: str | Path | None = None,
        batch_size: int = 32,
        **settings: float | None,
    ) -> QuestionAnswerer:
        """An ONNX model run with onnxruntime; tokenizer and settings from ``tokenizer_dir``,
        by default the ONNX file's directory (where :mod:`qa_lightning.export` puts them)."""
        onnx_path = resolve_onnx_path(onnx_path)
        tokenizer_dir = _existing_dir(tokenizer_dir or onnx_path.parent, "model_dir")
        _check_batch_size(batch_size)
        check_model_dir(tokenizer_dir)
        inference_settings = InferenceSettings.from_dir(tokenizer_dir).updated(**settings)
        tokenizer = load_tokenizer(str(tokenizer_dir))
        # the export writes the model's config.json beside model.onnx
        vocab_size = model_vocab_size(str(tokenizer_dir))
        check_tokenizer_fits(tokenizer, tokenizer_dir, vocab_size, onnx_path)
        return cls(tokenizer, OnnxLogits(onnx_path), inference_settings, batch_size)

    def answer(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        top_k: int = 1,
        progress: bool = False,
    ) -> list[list[Answer]]:
        """Up to ``top_k`` answers per question, best first (``[]`` when no span is valid)."""
        if top_k <= 0:
            raise ConfigError(f"invalid top_k={top_k}: must be > 0.")
        check_inputs(questions, contexts)
        answers: list[list[Answer]] = []
        with tqdm(
            total=len(questions), unit="question", desc="answering", disable=not progress
        ) as bar:
            size = self.batch_size * CHUNK_BATCHES
            for first in range(0, len(questions), size):
                chunk = slice(first, first + size)
                answers.extend(self._answer_chunk(questions[chunk], contexts[chunk], top_k))
                bar.update(len(questions[chunk]))
        return answers

    def _answer_chunk(
        self, questions: Sequence[str], contexts: Sequence[str], top_k: int
    ) -> list[list[Answer]]:
        s = self.settings
        questions, cut = truncate_questions(self.tokenizer, questions, s.max_question_tokens)
        if cut:
            log.warning(
                "%d question(s) longer than max_question_tokens=%d tokens were truncated",
                len(cut),
                s.max_question_tokens,
            )
        windows = make_eval_windows(self.tokenizer, questions, contexts, s.max_length, s.stride)
        keys = [k for k in windows if k != "length"]
        # longest first as in evaluation (memory runs out, if it does, on the first batch)
        window_of, candidates = [], []
        window_nulls = np.zeros(len(windows["length"]))
        for rows in sorted_batches(windows["length"], self.batch_size, self.equal_length):
            batch = self.collator([{k: windows[k][i] for k in keys} for i in rows])
            spans = best_window_spans(
                *self.logits_fn(batch),
                batch["offset_mapping"],
                s.n_best,
                s.max_answer_length,
                top_k=s.n_best,
            )
            window_nulls[rows] = spans.null_scores.numpy()
            window_of.append(np.repeat(rows, spans.scores.shape[1]))
            candidates.append(
                [t.flatten().numpy() for t in (spans.scores, spans.start_chars, spans.end_chars)]
            )
        window = np.concatenate(window_of)
        by_window = np.argsort(window, kind="stable")  # windows are in question order
        index = np.asarray(windows["example_index"])[window[by_window]]
        flat = [np.concatenate(parts)[by_window] for parts in zip(*candidates, strict=True)]
        bounds = np.searchsorted(index, np.arange(len(questions) + 1))
        nulls = example_null_scores(
            np.asarray(windows["example_index"]), window_nulls, len(questions)
        )
        return [
            rank_answers(
                contexts[i],
                *(values[bounds[i] : bounds[i + 1]] for values in flat),
                n_best=s.n_best,
                top_k=top_k,
                null_score=float(nulls[i]) if s.version_2_with_negative else None,
                null_score_diff_threshold=s.null_score_diff_threshold,
            )
            for i in range(len(questions))
        ]


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
    return questions, problems


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
    :func:`~qa_lightning.integrity.write_atomic`: an interrupted run leaves no half-written file.
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


def _check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ConfigError(
            f"invalid batch_size={batch_size!r}: must be an integer > 0 (e.g. batch_size=32)."
        )


def resolve_onnx_path(onnx_path: str | Path) -> Path:
    """The ONNX file ``onnx_path`` names: the file itself, or ``model.onnx`` in a directory that
    :mod:`qa_lightning.export` wrote."""
    path = Path(onnx_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ConfigError(
            f"onnx_path='{path}' does not exist (resolved to '{path.resolve()}'); export one "
            "with python -m qa_lightning.export ckpt_path=... format=onnx."
        )
    return path


def _existing_dir(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{key}='{path}' is not a directory (resolved to '{path.resolve()}'); give a Hugging "
            "Face model directory, such as a training run's hf_model/."
        )
    return path
