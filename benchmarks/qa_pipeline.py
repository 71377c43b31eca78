"""Best answers of ``transformers.pipeline("question-answering")`` over a jsonl of questions.

transformers 5 removed the question-answering pipeline, so this script imports nothing of
qa_lightning and runs with a transformers 4 folder first on ``PYTHONPATH`` (``make test``
installs one in ``.venv/transformers4``). The pipeline gets ``predict``'s windowing and answer
length (``settings``); each setting of ``align_to_words`` writes one line of answers. With
``"version_2_with_negative": true`` in ``settings`` it runs with ``handle_impossible_answer``
(the null answer ``""`` is a candidate); with ``"top_k": K`` the line also holds each question's
``K`` best answers (``"top_k_answers"``).

    PYTHONPATH=.venv/transformers4 python benchmarks/qa_pipeline.py MODEL_DIR Q.jsonl A.jsonl \
        '{"max_length": 384, "stride": 128, "max_question_tokens": 64, "max_answer_length": 30}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Where ``make test`` installs transformers 4 (``pip install --target``); QA_TRANSFORMERS4
#: overrides it.
TRANSFORMERS4 = Path(
    os.environ.get("QA_TRANSFORMERS4", Path(__file__).resolve().parents[1] / ".venv/transformers4")
)


def pipeline_answers(
    model_dir: Path, rows: list[dict], settings: dict, transformers4: Path = TRANSFORMERS4
) -> list[dict]:
    """Run this script on ``rows`` (``question``, ``context``) in a process with
    ``transformers4`` first on its path: one ``{"align_to_words", "answers", "transformers"}``
    dict per alignment setting."""
    with tempfile.TemporaryDirectory() as tmp:
        questions, answers = Path(tmp) / "questions.jsonl", Path(tmp) / "answers.jsonl"
        questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(transformers4), os.environ.get("PYTHONPATH")])
            ),
        }
        command = [sys.executable, __file__, str(model_dir), str(questions), str(answers)]
        subprocess.run([*command, json.dumps(settings)], check=True, env=env)
        return [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]


def main(model_dir: str, questions: str, answers: str, settings_json: str) -> None:
    import transformers

    settings = json.loads(settings_json)
    pipe = transformers.pipeline("question-answering", model=model_dir, device="cpu")
    with open(questions, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    with open(answers, "w", encoding="utf-8") as out:
        top_k = settings.get("top_k", 1)
        for align in (True, False):
            found = [
                pipe(
                    question=row["question"],
                    context=row["context"],
                    max_seq_len=settings["max_length"],
                    doc_stride=settings["stride"],
                    max_question_len=settings["max_question_tokens"],
                    max_answer_len=settings["max_answer_length"],
                    align_to_words=align,
                    handle_impossible_answer=settings.get("version_2_with_negative", False),
                    top_k=top_k,
                )
                for row in rows
            ]
            ranked = [answers if isinstance(answers, list) else [answers] for answers in found]
            record = {
                "align_to_words": align,
                "answers": [answers[0]["answer"] for answers in ranked],
                "transformers": transformers.__version__,
            }
            if top_k > 1:
                record["top_k_answers"] = [[a["answer"] for a in answers] for answers in ranked]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
