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

from omegaconf import DictConfig

from qa_lightning.answers.settings import SETTING_KEYS
from qa_lightning.cli import explain_out_of_memory, hydra_main, quiet_output, report_errors
from qa_lightning.core.config import register_resolvers
from qa_lightning.core.errors import ConfigError
from qa_lightning.runs.checkpoint_reading import trust_setting
from qa_lightning.serving.answerer import QuestionAnswerer, check_inputs
from qa_lightning.serving.jsonl import STDIO, load_question_file, write_answers
from qa_lightning.serving.model_keys import (
    GivenModel,
    check_onnx_precision,
    given_model,
    load_answerer,
)

log = logging.getLogger(__name__)
register_resolvers()


def configured_answerer(cfg: DictConfig, model: GivenModel) -> QuestionAnswerer:
    """The answerer of ``model`` (:func:`given_model` of ``cfg``) with ``cfg``'s settings."""
    return load_answerer(
        model,
        cfg.device,
        cfg.batch_size,
        cfg.precision,
        trust_setting(cfg),
        **{key: cfg.get(key) for key in SETTING_KEYS},
    )


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
    for key, example in (("top_k", 3), ("batch_size", 32)):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(
                f"invalid config: {key}={value!r}; must be an integer > 0 (e.g. {key}={example})."
            )
    top_k = cfg.top_k
    model = given_model(cfg)  # the model keys and paths, before any input is read
    check_onnx_precision(model, cfg.precision)
    if single:
        question, context = _text(cfg.question), _text(cfg.context)
        check_inputs([question], [context])  # before loading the model
        answerer = configured_answerer(cfg, model)
        with answering_memory(cfg):
            answers = answerer.answer([question], [context], top_k)[0]
        if not answers:
            print("no answer: no span of the context fits the model's limits")
        for rank, answer in enumerate(answers, start=1):
            print(f"{rank}. {json.dumps(answer.as_dict(), ensure_ascii=False)}")
        return [answer.as_dict() for answer in answers]
    output = answers_output(cfg)
    questions, problems = load_question_file(cfg.input)
    answerer = configured_answerer(cfg, model)
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


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    quiet_output(cfg)
    report_errors(lambda: predict(cfg))


if __name__ == "__main__":
    main()
