"""Answer questions: ``python -m qa_lightning.predict model_dir=... question=... context=...``,
``input=questions.jsonl output=answers.jsonl``, or jsonl from standard input to standard output
with ``input=-`` (see ``conf/predict.yaml``)."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from qa_lightning.answers.settings import SETTING_KEYS
from qa_lightning.cli import CONFIG_PATH, explain_out_of_memory, report_errors
from qa_lightning.core.config import register_resolvers
from qa_lightning.core.errors import ConfigError
from qa_lightning.serving.answerer import QuestionAnswerer, check_inputs
from qa_lightning.serving.jsonl import STDIO, load_question_file, write_answers

log = logging.getLogger(__name__)
register_resolvers()


def load_answerer(cfg: DictConfig) -> QuestionAnswerer:
    """The configured backend: ``torch`` (``model_dir``) or ``onnx`` (``onnx_path``)."""
    settings = {key: cfg.get(key) for key in SETTING_KEYS}
    if cfg.backend == "torch":
        if not cfg.get("model_dir"):
            raise ConfigError(
                "give model_dir=PATH, a Hugging Face model directory such as a training run's "
                "outputs/train/RUN/hf_model (or backend=onnx onnx_path=PATH)."
            )
        return QuestionAnswerer.from_model_dir(
            cfg.model_dir, cfg.device, cfg.batch_size, cfg.precision, **settings
        )
    if cfg.backend == "onnx":
        if cfg.precision not in ("auto", "32-true"):
            raise ConfigError(
                f"invalid config: precision={cfg.precision!r} with backend=onnx, which runs the "
                "exported model in its own precision (fp32, or int8 for quantize=int8 exports); "
                "precision applies to backend=torch."
            )
        if not cfg.get("onnx_path"):
            raise ConfigError(
                "backend=onnx needs onnx_path=PATH, written by "
                "python -m qa_lightning.export ckpt_path=... format=onnx."
            )
        return QuestionAnswerer.from_onnx(
            cfg.onnx_path, cfg.get("model_dir"), cfg.batch_size, **settings
        )
    raise ConfigError(f"invalid config: backend={cfg.backend!r}; use torch or onnx.")


def _text(value: Any) -> Any:
    """Hydra reads ``context=1998`` as a number: a number given on the command line is text."""
    return str(value) if isinstance(value, int | float) else value


def answering_memory(cfg: DictConfig) -> AbstractContextManager[None]:
    """Running out of memory while answering becomes a :class:`ResourceError` naming the
    settings that decide the memory needed."""
    return explain_out_of_memory(
        "answering",
        {
            "batch_size": cfg.batch_size,
            "max_length": cfg.get("max_length") or "the model's",
            "device": cfg.device,
        },
        "lower batch_size (the answers do not depend on it), or use device=cpu.",
    )


def answers_output(cfg: DictConfig) -> str:
    """Where the answers to ``input`` go: ``output``; if unset, standard output (``-``) for
    ``input=-``, else ``<run dir>/answers.jsonl``."""
    if cfg.get("output"):
        return str(cfg.output)
    if str(cfg.input) == STDIO:
        return STDIO
    return str(Path(cfg.paths.output_dir) / "answers.jsonl")


def predict(cfg: DictConfig) -> Any:
    """Answer one ``question``/``context`` (printed; returns the answers as dicts) or the jsonl
    lines of ``input`` (a file, or ``-`` for standard input), written to :func:`answers_output`;
    returns a summary."""
    single = cfg.get("question") is not None or cfg.get("context") is not None
    if single == bool(cfg.get("input")):
        raise ConfigError(
            "give either question=... context=... (one question), or input=FILE.jsonl or "
            'input=- for standard input (one {"question": ..., "context": ...} object a line).'
        )
    top_k = cfg.top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
        raise ConfigError(f"invalid config: top_k={top_k!r}; must be an integer > 0 (e.g. 3).")
    if single:
        question, context = _text(cfg.question), _text(cfg.context)
        check_inputs([question], [context])  # before loading the model
        answerer = load_answerer(cfg)
        with answering_memory(cfg):
            answers = answerer.answer([question], [context], top_k)[0]
        if not answers:
            print("no answer: no span of the context fits the model's limits")
        for rank, answer in enumerate(answers, start=1):
            print(f"{rank}. {json.dumps(answer.as_dict(), ensure_ascii=False)}")
        return [answer.as_dict() for answer in answers]
    output = answers_output(cfg)
    questions, problems = load_question_file(cfg.input)
    answerer = load_answerer(cfg)
    with answering_memory(cfg):
        summary = write_answers(answerer, questions, problems, output, top_k, cfg.progress)
    bad = summary["bad_lines"]
    skipped = (
        f"; skipped {len(bad)} bad line(s): "
        + ", ".join(f"line {b['line']} ({b['problem']})" for b in bad)
        if bad
        else ""
    )
    into = "standard output" if output == STDIO else summary["output"]
    # with answers on standard output, the summary goes to standard error (as the logs do)
    print(
        f"answered {summary['answered']} question(s) into {into}{skipped}",
        file=sys.stderr if output == STDIO else sys.stdout,
    )
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    report_errors(lambda: predict(cfg))


if __name__ == "__main__":
    main()
