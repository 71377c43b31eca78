"""CPU throughput of the int8 ONNX export against fp32 PyTorch, bf16-mixed PyTorch and fp32 ONNX.

A fine-tuned Hugging Face directory is exported to fp32 ONNX and quantised to int8 with the default
recipe (``qa_lightning.serving.int8``; or ``--int8 DIR [DIR ...]``, exports to time instead, e.g. of
several recipes). The same validation questions are then answered by each model, taking turns,
best of ``--repeats``:

- evaluation: ``trainer.validate`` of ``QAModule`` (PyTorch) or ``OnnxQAModule`` (onnxruntime)
  on the data module's windows, post-processing and EM/F1 included (``qa_lightning.evaluate``);
- predict: ``QuestionAnswerer.answer`` over all questions (``qa_lightning.predict`` without its
  start-up), with the answers compared with fp32 PyTorch's.

bf16-mixed runs only on CPUs with native bf16. Ratios are against fp32 PyTorch in the same run.
``--students DIR ...`` adds other Hugging Face directories with the same tokenizer (e.g. a
distilled student of ``--model``), timed as PyTorch fp32 and bf16-mixed against the same baseline
(their int8 exports go into ``--int8``). Tokenisation of the data module is not timed; model
loading is not timed.

Predict also answers the questions in a shuffled order (untimed) and counts the best answers
that change: a model whose answers depend on the other questions of a batch changes some.
``--mechanisms`` quantises the model in each way int8 activations can be quantised, instead of
one int8 export: dynamic and fused, run in batches as before (each input's scale from the whole
padded batch) and one window at a time (as predict, evaluate and serve run it); static with the
scales calibrated on ``--calibration-windows`` windows of the shared training questions
(percentile, the default, and entropy, unfused; percentile fused, its attention fp32).

With ``--plot FILE.png`` (needs matplotlib) the run also draws its speed/accuracy frontier: the
evaluation's F1 of each model against its speed-up over fp32 PyTorch, one point per row
(docs/frontier.md: the teacher, its students, each in fp32, bf16 and int8).

    python benchmarks/int8_throughput.py --model RUN/hf_model [--repeats 2] [--limit N] \
        [--int8 EXPORT_DIR ...] [--students STUDENT/hf_model ...] [--no-predict] \
        [--mechanisms [--calibration-windows 256]] [--plot frontier.png]
"""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

from qa_lightning.answers.metrics import squad_v1_scores
from qa_lightning.core.hardware import cpu_supports_bf16, cpu_supports_int8_dot
from qa_lightning.data import SquadDataModule
from qa_lightning.model import QAModule
from qa_lightning.model.logits import OnnxLogits, TorchLogits
from qa_lightning.model.onnx_model import OnnxQAModule
from qa_lightning.model.width import size_key
from qa_lightning.runs.checkpoint_reading import load_model_dir
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.serving.exports import export_onnx
from qa_lightning.serving.int8 import QuantizationRecipe, calibration_windows, quantize_onnx

BASELINE = "PyTorch fp32"
#: ``--mechanisms``: the int8 exports compared (name -> recipe) and the name of the dynamic
#: export that also runs in batches as before (padded, every window of a batch in one pass)
MECHANISMS = {
    "ONNX int8 dynamic, a window at a time": QuantizationRecipe(activations="dynamic", fuse=True),
    "ONNX int8 static, percentile (default)": QuantizationRecipe(activations="static"),
    "ONNX int8 static, entropy": QuantizationRecipe(
        activations="static", calibration_method="entropy"
    ),
    "ONNX int8 static, percentile, fused": QuantizationRecipe(activations="static", fuse=True),
}
BATCHED = "ONNX int8 dynamic, batched (before)"
#: the seed of the shuffled order of the questions
SHUFFLE_SEED = 0


def export_mechanisms(exported: Any, fp32_path: Path, windows: int, quick: bool) -> dict[str, Path]:
    """The :data:`MECHANISMS` exports of ``fp32_path``, beside it (name -> ONNX file); static
    ones calibrated on ``windows`` windows of the shared training questions."""
    calibration = calibration_windows(
        exported.tokenizer, exported.settings, common.TRAIN_FILE, 32 if quick else windows
    )
    paths = {}
    for i, (name, recipe) in enumerate(MECHANISMS.items()):
        paths[name] = fp32_path.with_name(f"model_int8_{i}.onnx")
        quantize_onnx(fp32_path, paths[name], recipe, calibration=calibration)
    return {BATCHED: paths[next(iter(MECHANISMS))], **paths}


def answers_in_order(answerer: QuestionAnswerer, questions: list, contexts: list, order: list):
    """The best answer (text, start, end) of each question, asked in ``order``, in file order."""
    found = answerer.answer([questions[i] for i in order], [contexts[i] for i in order])
    best: list[Any] = [None] * len(order)
    for answers, i in zip(found, order, strict=True):
        best[i] = (answers[0].text, answers[0].start, answers[0].end) if answers else ("", 0, 0)
    return best


def plot_frontier(path: Path, points: dict[str, tuple[float, float]], title: str) -> None:
    """Draw ``points`` (name -> (speed-up, F1)) as a labelled scatter into ``path``: squares int8,
    triangles bf16-mixed, circles fp32."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 6.5))
    for i, (name, (speedup, f1)) in enumerate(points.items()):
        kind = "int8" if "int8" in name else "bf16" if "bf16" in name else "fp32"
        marker, colour = {"int8": ("s", "C0"), "bf16": ("^", "C2"), "fp32": ("o", "C1")}[kind]
        axes.scatter(speedup, f1, marker=marker, color=colour, label=kind)
        label = re.sub(r" \(\d+ layers, feed-forward \d+\)", "", name)
        axes.annotate(
            label,
            (speedup, f1),
            textcoords="offset points",
            xytext=(6, 6 - 12 * (i % 2)),
            fontsize=7,
        )
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), loc="lower left")
    axes.set_xlabel("evaluation questions/s against fp32 PyTorch of --model")
    axes.set_ylabel("F1 (validation)")
    axes.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--int8", nargs="+", default=None, help="int8 export directories (default: export one)"
    )
    parser.add_argument(
        "--students", nargs="+", default=(), help="more PyTorch model directories to time"
    )
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts")
    parser.add_argument("--no-predict", action="store_true", help="time evaluation only")
    parser.add_argument(
        "--mechanisms", action="store_true", help="int8 with dynamic and static activations"
    )
    parser.add_argument("--calibration-windows", type=int, default=256, help="static int8")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of F1 against speed-up")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 64
    if args.mechanisms and args.int8:
        parser.error("--mechanisms makes its own int8 exports: leave out --int8")
    model_dir = common.setup(args)
    exported = load_model_dir(model_dir)
    settings = exported.settings

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(exported, Path(tmp) / "onnx_model")
        if args.int8:
            int8_paths = {f"ONNX int8 ({Path(d).name})": Path(d) / "model.onnx" for d in args.int8}
        elif args.mechanisms:
            int8_paths = export_mechanisms(
                exported, fp32_path, args.calibration_windows, args.quick
            )
        else:
            int8_paths = {"ONNX int8": Path(tmp) / "onnx_model" / "model_int8.onnx"}
            recipe = QuantizationRecipe()
            calibration = calibration_windows(
                exported.tokenizer, settings, common.TRAIN_FILE, recipe.calibration_windows
            )
            quantize_onnx(fp32_path, int8_paths["ONNX int8"], recipe, calibration=calibration)
        recipes = {name: OnnxLogits(path).quantization or {} for name, path in int8_paths.items()}
        datamodule = SquadDataModule(
            model_dir,
            dataset_name=None,
            validation_file=str(common.VALIDATION_FILE),
            validation_samples=args.limit,
            max_length=settings.max_length,
            stride=settings.stride,
            max_question_tokens=settings.max_question_tokens,
            eval_batch_size=args.batch_size,
        )
        datamodule.setup("validate")
        decoding = {"n_best": settings.n_best, "max_answer_length": settings.max_answer_length}
        torch_module = QAModule(model_dir, **decoding)
        onnx_dir = str(fp32_path.parent)
        # name -> (module, trainer precision, logits function of predict)
        variants: dict[str, tuple[Any, str, Any]] = {
            BASELINE: (
                torch_module,
                "32-true",
                TorchLogits(exported.model, "cpu", "32-true", pack=True),
            ),
        }
        if cpu_supports_bf16():  # a model of its own: fp32's is packed for oneDNN
            bf16 = TorchLogits(load_model_dir(model_dir).model, "cpu", "bf16-mixed")
            variants["PyTorch bf16-mixed"] = (torch_module, "bf16-mixed", bf16)
        for student_dir in args.students:
            student = load_model_dir(student_dir)
            config = student.model.config
            name = (
                f"{Path(student_dir).parent.name} ({config.num_hidden_layers} layers, "
                f"feed-forward {getattr(config, size_key(config.model_type))})"
            )
            module = QAModule(student_dir, **decoding)
            variants[f"{name}, PyTorch fp32"] = (
                module,
                "32-true",
                TorchLogits(student.model, "cpu", "32-true", pack=True),
            )
            if cpu_supports_bf16():
                variants[f"{name}, PyTorch bf16-mixed"] = (
                    module,
                    "bf16-mixed",
                    TorchLogits(load_model_dir(student_dir).model, "cpu", "bf16-mixed"),
                )
        for name, path in {"ONNX fp32": fp32_path, **int8_paths}.items():
            module = OnnxQAModule(str(path), name_or_path=onnx_dir, **decoding)
            module.model.session.unpadded = name != BATCHED
            variants[name] = (module, "32-true", module.model.session)
        trainers = {p: common.cpu_trainer(p) for _, p, _ in variants.values()}

        examples = datamodule.val_examples
        questions, contexts = examples["question"][:], examples["context"][:]
        shuffled = list(range(len(questions)))
        random.Random(SHUFFLE_SEED).shuffle(shuffled)

        def evaluate(name: str) -> Callable[[], Any]:
            module, precision, _ = variants[name]

            def run() -> tuple[dict, dict]:
                trainers[precision].validate(module, datamodule=datamodule, verbose=False)
                return module.last_scores, module.last_predictions

            return run

        def answerer(name: str) -> QuestionAnswerer:
            return QuestionAnswerer(
                exported.tokenizer, variants[name][2], settings, args.batch_size
            )

        def predict(name: str) -> Callable[[], Any]:
            return lambda: [
                a[0].text if a else "" for a in answerer(name).answer(questions, contexts)
            ]

        seconds = {(n, task): float("inf") for n in variants for task in ("eval", "predict")}
        results: dict[tuple[str, str], Any] = {}
        for _ in range(args.repeats):
            for name in variants:  # taking turns: slow drifts of the machine hit all alike
                tasks = {"eval": evaluate(name)}
                if not args.no_predict:
                    tasks["predict"] = predict(name)
                for task, fn in tasks.items():
                    results[name, task], elapsed = common.timed(fn)
                    seconds[name, task] = min(seconds[name, task], elapsed)
        changed = {}  # best answers that another order of the questions changes
        if not args.no_predict:
            for name in variants:
                ordered = answers_in_order(
                    answerer(name), questions, contexts, list(range(len(questions)))
                )
                again = answers_in_order(answerer(name), questions, contexts, shuffled)
                changed[name] = sum(a != b for a, b in zip(ordered, again, strict=True))
        references = {
            str(i): list(answers["text"]) or [""]
            for i, answers in enumerate(examples["answers"][:])
        }

    base_eval = seconds[BASELINE, "eval"]
    base_answers = results[BASELINE, "eval"][1]
    rows: list[list[Any]] = []
    for name in variants:
        scores, answers = results[name, "eval"]
        same = sum(answers[q] == base_answers[q] for q in base_answers)
        row = [
            name,
            seconds[name, "eval"],
            f"{base_eval / seconds[name, 'eval']:.2f}x",
            f"{scores['em']:.2f} / {scores['f1']:.2f}",
            f"{100 * same / len(base_answers):.1f}",
        ]
        if not args.no_predict:
            base_predict = seconds[BASELINE, "predict"]
            texts, base_texts = results[name, "predict"], results[BASELINE, "predict"]
            same_predict = sum(a == b for a, b in zip(texts, base_texts, strict=True))
            predicted = squad_v1_scores({str(i): t for i, t in enumerate(texts)}, references)
            row += [
                seconds[name, "predict"],
                f"{len(texts) / seconds[name, 'predict']:.1f}",
                f"{base_predict / seconds[name, 'predict']:.2f}x",
                f"{predicted['f1']:.2f}",
                f"{100 * same_predict / len(texts):.1f}",
                changed[name],
            ]
        rows.append(row)
    headers = ["model", "evaluate, s", "vs fp32", "EM / F1", "same answer, %"]
    if not args.no_predict:
        headers += [
            "predict, s",
            "questions/s",
            "vs fp32",
            "F1",
            "same answer, %",
            "changed by order",
        ]
    title = (
        f"int8 vs fp32 on the CPU, {common.model_name(model_dir)}, {len(questions)} validation "
        f"questions, batch {args.batch_size}, best of {args.repeats} ({common.machine()}; int8 "
        f"dot products: {'yes' if cpu_supports_int8_dot() else 'NO'})"
    )
    common.print_table(title, headers, rows)
    if args.plot:
        points = {
            name: (base_eval / seconds[name, "eval"], results[name, "eval"][0]["f1"])
            for name in variants
        }
        plot_frontier(args.plot, points, title)
    for name, recipe in recipes.items():
        ratio = base_eval / seconds[name, "eval"]
        keys = ("fuse", "per_channel", "reduce_range", "op_types", "exclude", "activations")
        keys += ("calibration_method",) if recipe.get("activations") == "static" else ()
        print(
            f"{name}: {', '.join(f'{k}={recipe.get(k)}' for k in keys)}; evaluation vs fp32 "
            f"PyTorch {ratio:.2f}x (>= 2.0x: {common.verdict(ratio, 2.0)})"
        )


if __name__ == "__main__":
    main()
