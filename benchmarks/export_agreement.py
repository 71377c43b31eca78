"""Exports of a trained checkpoint against ``predict`` on the shared validation file.

The checkpoint is exported as a Hugging Face directory and as ONNX (``qa_lightning.export``).
Then, for every validation question: ``predict``'s best answer (PyTorch, the directory); the
ONNX model's best answer and the largest |onnxruntime - PyTorch| start/end logit over all
windows; and the ``question-answering`` pipeline's best answer (transformers 4, see
``qa_pipeline.py``), with ``predict``'s windowing and answer length, with and without its word
alignment. Agreement is also split between questions of one window and of several.

    python benchmarks/export_agreement.py --ckpt RUN/checkpoints/best-....ckpt \
        [--limit N] [--transformers4 DIR]
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import common
import torch
from qa_pipeline import TRANSFORMERS4, pipeline_answers

from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import make_eval_windows
from qa_lightning.model.logits import OnnxLogits, TorchLogits
from qa_lightning.runs.checkpoint_reading import load_checkpoint
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.serving.exports import export_onnx, save_hf


class ComparedLogits:
    """ONNX logits, with the largest difference from PyTorch's on the same batches recorded."""

    def __init__(self, onnx: OnnxLogits, torch_logits: TorchLogits) -> None:
        self.onnx, self.torch_logits = onnx, torch_logits
        self.max_abs_diff, self.windows = 0.0, 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        onnx_logits = self.onnx(batch)
        for ours, reference in zip(onnx_logits, self.torch_logits(batch), strict=True):
            self.max_abs_diff = max(self.max_abs_diff, float((ours - reference).abs().max()))
        self.windows += len(batch["input_ids"])
        return onnx_logits


def best_texts(answerer: QuestionAnswerer, questions: list[str], contexts: list[str]) -> list:
    return [a[0].text if a else "" for a in answerer.answer(questions, contexts, progress=True)]


def agreement(a: list[str], b: list[str], mask: list[bool]) -> str:
    same = sum(x == y for x, y, m in zip(a, b, mask, strict=True) if m)
    total = sum(mask)
    return f"{same}/{total} = {100 * same / total:.2f}%" if total else "-"


def main() -> None:
    parser = common.parser(__doc__, model=False)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by qa_lightning.train")
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--transformers4",
        type=Path,
        default=TRANSFORMERS4,
        help="a folder with transformers < 5 installed (pip install --target DIR), for the "
        f"question-answering pipeline (default: {TRANSFORMERS4})",
    )
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 32
    common.setup(args)
    examples = load_local_file(common.VALIDATION_FILE)
    if args.limit:
        examples = examples.select(range(min(args.limit, len(examples))))
    questions, contexts = examples["question"][:], examples["context"][:]

    exported = load_checkpoint(args.ckpt)
    settings = exported.settings
    windows = make_eval_windows(
        exported.tokenizer, questions, contexts, settings.max_length, settings.stride
    )
    counts = torch.bincount(torch.as_tensor(windows["example_index"]), minlength=len(questions))
    masks = {
        "all": [True] * len(questions),
        "one window": (counts == 1).tolist(),
        "several windows": (counts > 1).tolist(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf(exported, Path(tmp) / "hf_model")
        onnx_path = export_onnx(exported, Path(tmp) / "onnx_model")
        predict = QuestionAnswerer.from_model_dir(hf_dir, "cpu", args.batch_size, "32-true")
        ours = best_texts(predict, questions, contexts)
        compared = ComparedLogits(OnnxLogits(onnx_path), predict.logits_fn)
        onnx = best_texts(
            QuestionAnswerer(exported.tokenizer, compared, settings, args.batch_size),
            questions,
            contexts,
        )
        rows: list[list[Any]] = [
            ["ONNX max |logit diff| vs PyTorch", f"{compared.max_abs_diff:.2e}", "< 1e-4"],
            *[
                [f"ONNX answer == predict's, {n}", agreement(onnx, ours, m), "100%"]
                for n, m in masks.items()
            ],
        ]
        if not args.transformers4.is_dir():
            rows.append(["pipeline", f"not run: no {args.transformers4} (make setup)", ">= 99%"])
        else:
            rows_in = [
                {"question": q, "context": c} for q, c in zip(questions, contexts, strict=True)
            ]
            for run in pipeline_answers(hf_dir, rows_in, asdict(settings), args.transformers4):
                label = (
                    f"pipeline (transformers {run['transformers']}, "
                    f"align_to_words={run['align_to_words']})"
                )
                rows += [
                    [f"{label} == predict's, {n}", agreement(run["answers"], ours, m), ">= 99%"]
                    for n, m in masks.items()
                ]
    common.print_table(
        f"Exports of {args.ckpt} vs predict, {len(questions)} validation questions "
        f"({common.machine()})",
        ["measure", "value", "target"],
        rows,
    )


if __name__ == "__main__":
    main()
