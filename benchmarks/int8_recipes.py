"""Accuracy of int8 quantisation recipes: EM/F1 of each int8 ONNX model beside fp32.

A fine-tuned model (a checkpoint, or a Hugging Face directory) is exported to fp32 ONNX once, then
quantised with each recipe (``qa_lightning.serving.int8``, onnxruntime dynamic quantisation;
the static default is compared in int8_throughput.py ``--mechanisms``).
Each model is scored on the shared validation file with ``trainer.validate`` (``QAModule`` /
``OnnxQAModule``: the code path of ``python -m qa_lightning.evaluate``), and its answers are
compared with fp32 PyTorch's. No timing: see int8_throughput.py.

    python benchmarks/int8_recipes.py --ckpt RUN/checkpoints/best-....ckpt [--limit N]
    python benchmarks/int8_recipes.py --model RUN/hf_model [--recipes per-channel head-fp32]
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import common

from qa_lightning.data import SquadDataModule
from qa_lightning.model import QAModule
from qa_lightning.model.onnx_model import OnnxQAModule
from qa_lightning.runs.checkpoint_reading import load_checkpoint, load_model_dir
from qa_lightning.serving.exports import export_onnx
from qa_lightning.serving.int8 import DYNAMIC_OP_TYPES, QuantizationRecipe, quantize_onnx


def recipes(layers: int) -> dict[str, QuantizationRecipe]:
    """The compared recipes; ``layers``: the encoder's depth (for "FFN output fp32 in the last
    layers"). "fused": onnxruntime's transformer fusions first, query/key/value in the int8
    ``Attention`` operator; "unfused": the traced graph's MatMuls only."""
    ffn_out = r"layer\.{}/(output/dense|ffn/lin2)/"
    half = "|".join(str(i) for i in range(layers // 2, layers))
    dynamic = partial(QuantizationRecipe, activations="dynamic", fuse=True)
    return {
        "onnxruntime default (unfused, all ops, per tensor)": dynamic(
            fuse=False, per_channel=False, op_types=DYNAMIC_OP_TYPES, exclude=()
        ),
        "unfused MatMul, per channel": dynamic(fuse=False),
        "unfused MatMul, per channel, FFN output fp32": dynamic(
            fuse=False, exclude=(ffn_out.format(r"\d+"),)
        ),
        "fused, per channel": dynamic(),
        "fused, per channel, QA head fp32": dynamic(exclude=("qa_outputs",)),
        "fused, per channel, FFN output fp32": dynamic(exclude=(ffn_out.format(r"\d+"),)),
        "fused, per channel, FFN output fp32 in the last half": dynamic(
            exclude=(ffn_out.format(f"({half})"),)
        ),
        "fused, per channel, FFN output fp32 in the first half": dynamic(
            exclude=(ffn_out.format(f"({'|'.join(str(i) for i in range(layers // 2))})"),)
        ),
    }


def score(module: QAModule, datamodule: SquadDataModule) -> tuple[dict[str, float], dict]:
    common.cpu_trainer().validate(module, datamodule=datamodule, verbose=False)
    return module.last_scores, module.last_predictions


def main() -> None:
    parser = common.parser(__doc__, model=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by qa_lightning.train")
    source.add_argument("--model", help="a Hugging Face model directory (e.g. RUN/hf_model)")
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--recipes", nargs="+", default=None, help="names (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 64
    common.setup(args)
    exported = load_checkpoint(args.ckpt) if args.ckpt else load_model_dir(args.model)
    chosen = recipes(exported.model.config.num_hidden_layers)
    if args.recipes:
        chosen = {name: r for name, r in chosen.items() if any(k in name for k in args.recipes)}

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(exported, Path(tmp) / "fp32")
        datamodule = SquadDataModule(
            str(fp32_path.parent),
            dataset_name=None,
            validation_file=str(common.VALIDATION_FILE),
            validation_samples=args.limit,
            max_length=exported.settings.max_length,
            stride=exported.settings.stride,
            max_question_tokens=exported.settings.max_question_tokens,
        )
        datamodule.setup("validate")
        decoding = {
            "n_best": exported.settings.n_best,
            "max_answer_length": exported.settings.max_answer_length,
        }
        # the architecture from the export's config.json, then the exported weights
        torch_module = QAModule(str(fp32_path.parent), from_scratch=True, **decoding)
        torch_module.model = exported.model
        reference, reference_answers = score(torch_module, datamodule)

        def row(name: str, scores: dict, answers: dict, size: float) -> list[Any]:
            same = sum(answers[q] == reference_answers[q] for q in reference_answers)
            return [
                name,
                f"{scores['em']:.2f}",
                f"{scores['f1']:.2f}",
                f"{scores['f1'] - reference['f1']:+.2f}",
                f"{100 * same / len(reference_answers):.1f}",
                f"{size:.1f}",
            ]

        size_fp32 = fp32_path.stat().st_size / 2**20
        rows.append(row("fp32 PyTorch", reference, reference_answers, size_fp32))
        fp32_onnx = OnnxQAModule(str(fp32_path), name_or_path=str(fp32_path.parent), **decoding)
        rows.append(row("fp32 ONNX", *score(fp32_onnx, datamodule), size_fp32))
        for name, recipe in chosen.items():
            int8_path = Path(tmp) / "int8.onnx"
            quantize_onnx(fp32_path, int8_path, recipe)
            module = OnnxQAModule(str(int8_path), name_or_path=str(fp32_path.parent), **decoding)
            rows.append(row(name, *score(module, datamodule), int8_path.stat().st_size / 2**20))
            print(rows[-1], flush=True)
    common.print_table(
        f"int8 recipes, {args.ckpt or args.model}, {len(reference_answers)} validation questions "
        f"({common.machine()})",
        ["model", "EM", "F1", "F1 - fp32", "same answer as fp32, %", "MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
