"""Answer (question, context) pairs with a trained model: the windowing and span decoding of
training and evaluation, ranked into the ``top_k`` answers of each question with probabilities.

A question's candidates are the ``n_best`` best spans of each of its windows
(:func:`~qa_lightning.answers.postprocess.best_window_spans`); the same span found in overlapping
windows is kept once with its best score; the ``n_best`` best candidates are turned into
probabilities by a softmax over their scores (``start_logit + end_logit``), as ``utils_qa.py``
does. The best answer is therefore the one evaluation scores. A SQuAD v2 model
(``version_2_with_negative`` in its settings) also has the null answer ``""`` among its candidates
(see :func:`~qa_lightning.answers.ranking.rank_answers`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qa_lightning.answers.postprocess import (
    best_window_spans,
    example_null_scores,
)
from qa_lightning.answers.ranking import Answer, rank_answers
from qa_lightning.answers.settings import InferenceSettings, check_model_dir
from qa_lightning.core.errors import ConfigError, InputError
from qa_lightning.core.tokenizer import check_tokenizer_fits, load_tokenizer, model_vocab_size
from qa_lightning.data.collate import WindowCollator
from qa_lightning.data.sampling import sorted_batches
from qa_lightning.data.windowing import make_eval_windows, truncate_questions
from qa_lightning.model.logits import (
    LogitsFn,
    OnnxLogits,
    TorchLogits,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)
#: Questions windowed together, in ``batch_size`` units: their windows are batched sorted by
#: length (as evaluation does), so that short windows are not padded to long ones.
CHUNK_BATCHES = 16


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

    def replaced(
        self, logits_fn: LogitsFn | None = None, equal_length: bool | None = None
    ) -> QuestionAnswerer:
        """This answerer with another model function or batching (the rest shared)."""
        return QuestionAnswerer(
            self.tokenizer,
            logits_fn or self.logits_fn,
            self.settings,
            self.batch_size,
            self.equal_length if equal_length is None else equal_length,
        )

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
        from qa_lightning.model.loading import load_qa_model

        model_dir = _existing_dir(model_dir, "model_dir")
        _check_batch_size(batch_size)
        check_model_dir(model_dir)
        inference_settings = InferenceSettings.from_dir(model_dir).updated(**settings)
        device = resolve_device(device)  # all checks before the model is loaded
        precision = resolve_precision(precision, device)
        tokenizer = load_tokenizer(str(model_dir))
        check_tokenizer_fits(tokenizer, model_dir, model_vocab_size(str(model_dir)), model_dir)
        log.info("answering with PyTorch on %s in %s", device, precision)
        model = load_qa_model(str(model_dir), trained_head=True)
        logits_fn = TorchLogits(model, device, precision, pack=True)
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
