"""Evaluation throughput of MiniLM on CPU: inference + post-processing over the shared validation
file, reference recipe vs project, and post-processing alone on the same logits.

Reference: windows padded to 384 in file order, batches of 32, then ``utils_qa``'s double loop over
each window's argsorted logits, then SQuAD EM/F1. Project: ``Trainer.validate`` of ``QAModule`` on
the data module's validation windows (on CPU, the default: batches of up to 32 windows of one
length, unpadded; also timed with ``data.eval_equal_length=false``: batches of 32 sorted windows
padded to the longest, a multiple of 8): ``best_window_spans`` per batch, ``best_example_spans``
and EM/F1 at the epoch's end. Both use the same model weights; tokenisation is not timed (see
preprocess.py).

Post-processing alone is timed on the same logits (the reference's padded windows) for both, and
their predicted texts must agree on every question. With MiniLM the QA head is untrained, so
"own logits" agreement is low: padding tokens then get high logits that take n-best slots in the
reference's padded windows. Pass a fine-tuned model directory with --model for realistic answers
(and meaningful EM/F1, printed for each side).

On a CPU with native bf16 (``avx512_bf16`` / ``amx_bf16``) the project is also timed with
``bf16-mixed`` (``trainer=cpu_bf16``), against the same fp32 reference.

    python benchmarks/eval_throughput.py [--model DIR] [--limit N] [--repeats 1] [--quick]
"""

from __future__ import annotations

from typing import Any

import common
import datasets
import lightning as L
import numpy as np
import torch
from baseline import map_features, postprocess_qa_predictions
from torch.utils.data import DataLoader

from qa_lightning.answers.metrics import squad_v1_scores
from qa_lightning.answers.postprocess import best_window_spans, example_answers, window_rows
from qa_lightning.core.hardware import cpu_supports_bf16
from qa_lightning.data import SquadDataModule
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.data.windowing import NO_OFFSET
from qa_lightning.model import QAModule

N_BEST, MAX_ANSWER_LENGTH = 20, 30


@torch.inference_mode()
def reference_logits(
    model: torch.nn.Module, features: datasets.Dataset, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the padded windows, in order (what the recipe's ``Trainer.predict`` returns)."""
    columns = [c for c in MODEL_INPUTS if c in features.column_names]
    starts, ends = [], []
    for batch in DataLoader(features.with_format("torch", columns=columns), batch_size):
        outputs = model(**batch)
        starts.append(outputs.start_logits.numpy())
        ends.append(outputs.end_logits.numpy())
    return np.concatenate(starts), np.concatenate(ends)


def reference_evaluate(
    model, examples, features, batch_size: int
) -> tuple[dict[str, str], dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Predict, post-process, score (the recipe's ``Trainer.evaluate``): predictions, EM/F1,
    logits."""
    logits = reference_logits(model.eval(), features, batch_size)
    predictions = postprocess_qa_predictions(examples, features, logits, N_BEST, MAX_ANSWER_LENGTH)
    answers = zip(examples["id"], examples["answers"], strict=True)
    scores = squad_v1_scores(predictions, {qid: a["text"] for qid, a in answers})
    return predictions, scores, logits


def project_evaluate(
    trainer: L.Trainer, module: QAModule, datamodule: SquadDataModule
) -> tuple[dict[str, str], dict[str, float]]:
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return module.last_predictions, module.last_scores


def project_postprocess(examples, index, start_logits, end_logits, offsets) -> dict[str, str]:
    """``QAModule``'s post-processing (``validation_step`` + ``on_validation_epoch_end``)."""
    spans = best_window_spans(start_logits, end_logits, offsets, N_BEST, MAX_ANSWER_LENGTH)
    rows = window_rows(torch.as_tensor(index), spans).numpy()
    return example_answers(rows, examples["id"][:], examples["context"][:]).predictions()


def project_inputs(examples, features) -> tuple[np.ndarray, torch.Tensor]:
    """The reference windows in the project's form: example positions and an offsets tensor."""
    position = {qid: i for i, qid in enumerate(examples["id"])}
    index = np.array([position[qid] for qid in features["example_id"]])
    offsets = torch.tensor(
        [
            [o if o is not None else (NO_OFFSET, NO_OFFSET) for o in window]
            for window in features["offset_mapping"]
        ]
    )
    return index, offsets


def agreement(a: dict[str, str], b: dict[str, str]) -> float:
    """Percentage of questions with the same text; the recipe's ``"empty"`` equals ``""``."""
    same = sum((a[q] if a[q] != "empty" else "") == (b[q] if b[q] != "empty" else "") for q in a)
    return 100 * same / len(a)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 64
    path = common.setup(args)

    datamodules = {}
    for equal_length in (True, False):
        datamodules[equal_length] = SquadDataModule(
            path,
            dataset_name=None,
            validation_file=str(common.VALIDATION_FILE),
            validation_samples=args.limit,
            eval_batch_size=args.batch_size,
            eval_equal_length=equal_length,
        )
        datamodules[equal_length].setup("validate")
    datamodule = datamodules[True]
    examples = datamodule.val_examples
    features = map_features(datamodule.tokenizer, examples, train=False)
    module = QAModule(path, n_best=N_BEST, max_answer_length=MAX_ANSWER_LENGTH)
    model = module.model  # the same weights on both sides
    # project runs: fp32 (the default), fp32 padded, and bf16 where the CPU computes it natively
    runs = {"32-true": ("32-true", True), "32-true padded": ("32-true", False)}
    if cpu_supports_bf16():
        runs["bf16-mixed"] = ("bf16-mixed", True)
    trainers = {precision: common.cpu_trainer(precision) for precision, _ in runs.values()}
    reference_logits(model.eval(), features.select(range(1)), 1)  # warm-up
    reference_s, project_s = float("inf"), dict.fromkeys(runs, float("inf"))
    project, project_scores = {}, {}
    for _ in range(args.repeats):
        (reference, reference_scores, (start_logits, end_logits)), seconds = common.timed(
            reference_evaluate, model, examples, features, args.batch_size
        )
        reference_s = min(reference_s, seconds)
        for run, (precision, equal_length) in runs.items():
            (project[run], project_scores[run]), seconds = common.timed(
                project_evaluate, trainers[precision], module, datamodules[equal_length]
            )
            project_s[run] = min(project_s[run], seconds)

    index, offsets = project_inputs(examples, features)
    repeats = max(3, args.repeats)
    same_reference, reference_post_s = common.best_of(
        repeats,
        lambda: postprocess_qa_predictions(
            examples, features, (start_logits, end_logits), N_BEST, MAX_ANSWER_LENGTH
        ),
    )
    same_project, project_post_s = common.best_of(
        repeats,
        lambda: project_postprocess(
            examples, index, torch.from_numpy(start_logits), torch.from_numpy(end_logits), offsets
        ),
    )

    questions = len(examples)
    e2e, post = reference_s / project_s["32-true"], reference_post_s / project_post_s
    same = agreement(same_reference, same_project)
    padded = reference_s / project_s["32-true padded"]
    rows: list[list[Any]] = [
        ["windows", len(features), len(datamodule.val_windows), "", "", ""],
        [
            "tokens run (padding included)",
            len(features) * len(features[0]["input_ids"]),
            sum(len(w) for w in datamodule.val_windows["input_ids"]),
            "",
            "",
            "",
        ],
        [
            "inference + post-processing + EM/F1, s",
            reference_s,
            project_s["32-true"],
            e2e,
            ">= 2.5x",
            common.verdict(e2e, 2.5),
        ],
        ["questions/s", questions / reference_s, questions / project_s["32-true"], e2e, "", ""],
        ["same, project padded, s", reference_s, project_s["32-true padded"], padded, "", ""],
        *[
            [
                f"EM / F1 ({run})",
                f"{reference_scores['em']:.2f} / {reference_scores['f1']:.2f}"
                if run == "32-true"
                else "",
                f"{scores['em']:.2f} / {scores['f1']:.2f}",
                "",
                "",
                "",
            ]
            for run, scores in project_scores.items()
        ],
        [
            "post-processing alone (same logits), s",
            reference_post_s,
            project_post_s,
            post,
            ">= 10x",
            common.verdict(post, 10),
        ],
        [
            "identical predicted text (same logits), %",
            "",
            "",
            same,
            "100",
            common.verdict(same, 100),
        ],
        [
            "identical predicted text (own logits), %",
            "",
            "",
            agreement(reference, project["32-true"]),
            "",
            "",
        ],
        [
            "identical text, unpadded vs padded project, %",
            "",
            "",
            agreement(project["32-true"], project["32-true padded"]),
            "",
            "",
        ],
    ]
    if "bf16-mixed" in project_s:
        bf16 = reference_s / project_s["bf16-mixed"]
        rows += [
            ["same, project bf16-mixed, s", reference_s, project_s["bf16-mixed"], bf16, "", ""],
            [
                "identical text, bf16 vs fp32 project, %",
                "",
                "",
                agreement(project["32-true"], project["bf16-mixed"]),
                "",
                "",
            ],
        ]
    common.print_table(
        f"Evaluation, {common.model_name(path)} fp32, {questions} validation questions, "
        f"batch {args.batch_size} ({common.machine()})",
        ["measure", "reference", "project", "ratio / value", "target", ""],
        rows,
    )


if __name__ == "__main__":
    main()
