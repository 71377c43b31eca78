"""int8 ONNX exports for CPU serving: onnxruntime dynamic quantisation, and its agreement with fp32.

    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx quantize=int8

Dynamic quantisation stores the weights of the chosen operators as int8 (per output channel or per
tensor) and quantises their inputs to uint8 at run time, per tensor, from each batch's range;
everything else stays fp32. Before quantising, onnxruntime's transformer fusions put each layer's
attention into one ``Attention`` operator (quantised whole). The recipe (``quantization.*`` in
``conf/export.yaml``) decides speed and accuracy; the default, chosen by measurement, is
per-channel int8 weights of every fused ``Attention`` and MatMul (see ``docs/int8.md``). It is
recorded under ``"quantization"`` in the export's ``qa_lightning.json`` and in the ONNX model's
metadata, which :class:`~qa_lightning.model.logits.OnnxLogits` reads to warn on CPUs without int8
dot products.

The export compares the int8 model's best answers and logits with fp32 PyTorch on a sample of
validation questions (``validation_file``, by default the checkpoint's) and warns when fewer than
``min_agreement`` of the best answers are the same.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qa_lightning.core.config import check_types
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.model.logits import QUANTIZATION_METADATA_KEY, LogitsFn, OnnxLogits, TorchLogits
from qa_lightning.serving.answerer import QuestionAnswerer

log = logging.getLogger(__name__)

#: ``quantize`` values: the weight types an export can be quantised to.
QUANTIZE_TYPES = ("int8",)
#: The operators onnxruntime's dynamic (``IntegerOps``) quantisation handles.
DYNAMIC_OP_TYPES = (
    "MatMul",
    "Attention",
    "Gather",
    "Conv",
    "LSTM",
    "Transpose",
    "EmbedLayerNormalization",
)
#: Key of the recipe and its check in ``qa_lightning.json`` (the model metadata uses
#: :data:`~qa_lightning.model.logits.QUANTIZATION_METADATA_KEY`).
SETTINGS_KEY = "quantization"


@dataclass(frozen=True)
class QuantizationRecipe:
    """How the weights are quantised (``quantization.*`` in ``conf/export.yaml``).

    ``fuse``: onnxruntime's transformer fusions first (attention, embedding and skip layer
    norms, bias + GELU into single operators), so that one ``Attention`` operator, quantised
    whole, replaces each layer's query/key/value products and softmax;
    ``per_channel``: one int8 scale per output channel of each weight, else one per tensor;
    ``reduce_range``: 7-bit weights (avoids saturation on CPUs without VNNI, costs accuracy);
    ``op_types``: the operator types quantised; ``exclude``: regular expressions of node names
    kept fp32 (e.g. ``qa_outputs`` for the QA head, ``layer\\.5/`` for the last layer of a
    6-layer model: its MatMuls, and with ``fuse`` its fused attention, see
    :func:`name_fused_nodes`); a pattern that matches no node stops the export.
    """

    fuse: bool = True
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = field(
        default=("MatMul", "Attention"),
        metadata={"fix": "give a list, e.g. quantization.op_types=[MatMul]."},
    )
    exclude: tuple[str, ...] = field(  # conf/export.yaml
        default=(),
        metadata={"fix": "give a list, e.g. quantization.exclude=[qa_outputs]."},
    )

    def __post_init__(self) -> None:
        check_types(asdict(self), QuantizationRecipe, "quantization.")
        unknown = [op for op in self.op_types if op not in DYNAMIC_OP_TYPES]
        if not self.op_types or unknown:
            raise ConfigError(
                f"invalid config: quantization.op_types={list(self.op_types)!r}; give a "
                "non-empty list of operator types that dynamic quantisation handles: "
                f"{list(DYNAMIC_OP_TYPES)} (e.g. quantization.op_types=[MatMul])."
            )
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(
                    f"invalid config: quantization.exclude entry {pattern!r} is not a regular "
                    f"expression ({error}); give node-name patterns such as [qa_outputs]."
                ) from error

    @classmethod
    def from_config(cls, section: DictConfig | dict[str, Any] | None) -> QuantizationRecipe:
        """The recipe of a ``quantization`` config section (missing keys: the defaults)."""
        values = OmegaConf.to_container(section) if OmegaConf.is_config(section) else section
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"invalid config: unknown key(s) quantization.{unknown}; the recipe takes "
                f"{[f.name for f in fields(cls)]}."
            )
        for name in ("op_types", "exclude"):  # null: none
            if name in values and (values[name] is None or isinstance(values[name], list)):
                values[name] = tuple(values[name] or ())
        return cls(**values)


@dataclass(frozen=True)
class Agreement:
    """Best answers and logits of a candidate model against a reference on the same windows."""

    questions: int
    windows: int
    same_best_answer: int
    max_abs_logit_diff: float

    @property
    def share(self) -> float:
        return self.same_best_answer / self.questions if self.questions else 1.0


def quantization_tools() -> ModuleType:
    """``onnxruntime.quantization``, or a :class:`ConfigError` saying how to install it."""
    try:
        import onnxruntime.quantization as tools
    except ImportError as error:
        raise ConfigError(
            "quantize=int8 needs onnxruntime's quantisation tools (onnxruntime.quantization, "
            f"which also needs onnx), which cannot be imported here ({error}): pip install "
            "'qa-lightning[export]', or export the fp32 model (format=onnx without quantize)."
        ) from error
    return tools


def excluded_nodes(onnx_path: str | Path, patterns: Sequence[str]) -> list[str]:
    """Names of the graph's nodes that match one of the regular expressions ``patterns``; a
    pattern that matches none is an :class:`ExportError` (the recorded recipe would claim what
    was not done)."""
    if not patterns:
        return []
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [node.name for node in graph.node]
    unmatched = [p for p in patterns if not any(re.search(p, name) for name in names)]
    if unmatched:
        weighted = [node.name for node in graph.node if node.op_type in DYNAMIC_OP_TYPES]
        raise ExportError(
            f"quantization.exclude entries {unmatched} match no node of the graph, so nothing "
            f"would be kept fp32 for them; node names look like {weighted[:3]} (a layer: "
            "'layer\\.5/', the QA head: 'qa_outputs')."
        )
    return [name for name in names if any(re.search(p, name) for p in patterns)]


def quantize_onnx(
    fp32_path: str | Path, int8_path: str | Path, recipe: QuantizationRecipe
) -> dict[str, Any]:
    """Quantise ``fp32_path`` dynamically into ``int8_path`` (int8 weights, uint8 activations
    quantised at run time), after :func:`fuse_transformer_graph` with ``recipe.fuse``; the
    recipe, as recorded in the model's metadata, is returned."""
    tools = quantization_tools()
    import onnx
    import onnxruntime

    int8_path = Path(int8_path)
    fused = int8_path.with_name(int8_path.name + ".fused")
    partial = int8_path.with_name(int8_path.name + ".part")
    record: dict[str, Any] = {
        "type": "int8",
        "method": "onnxruntime dynamic quantisation: int8 weights, uint8 activations "
        "quantised at run time",
        **asdict(recipe),
        "op_types": list(recipe.op_types),
        "exclude": list(recipe.exclude),
        "onnxruntime": onnxruntime.__version__,
    }
    root = logging.getLogger()  # onnxruntime's quantiser logs to the root logger
    root.addFilter(_quantizer_warnings)
    try:
        source = fp32_path
        if recipe.fuse:
            record["fused_operators"] = fuse_transformer_graph(fp32_path, fused)
            source = fused
        record["excluded_nodes"] = exclude = excluded_nodes(source, recipe.exclude)
        tools.quantize_dynamic(
            str(source),
            str(partial),
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=tools.QuantType.QInt8,
            nodes_to_exclude=exclude,
            # the fused operators are onnxruntime's own, unknown to ONNX shape inference
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        model = onnx.load(str(partial))
        entry = model.metadata_props.add()
        entry.key, entry.value = QUANTIZATION_METADATA_KEY, json.dumps(record)
        onnx.save(model, str(partial))
        os.replace(partial, int8_path)
    except (OSError, ExportError):
        raise  # disk full or unwritable: the export reports it with out_dir; the fusion's own
    except Exception as error:  # the quantiser raises many types
        raise ExportError(
            f"onnxruntime could not quantise '{fp32_path}' ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); try another recipe (quantization.op_types=[MatMul]) "
            "or export the fp32 model (format=onnx without quantize)."
        ) from error
    finally:
        root.removeFilter(_quantizer_warnings)
        partial.unlink(missing_ok=True)
        fused.unlink(missing_ok=True)
    return record


def fuse_transformer_graph(onnx_path: str | Path, fused_path: str | Path) -> dict[str, int]:
    """Write ``onnx_path`` with onnxruntime's transformer fusions (BERT patterns, which BERT,
    RoBERTa, DistilBERT and MiniLM exports traced with eager attention match) to ``fused_path``;
    returns how many operators of each fused type it has. The attention heads and hidden size
    come from the export's ``config.json`` beside ``onnx_path`` (else onnxruntime guesses them from
    the graph). A graph with nothing to fuse is written as it is."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    num_heads = hidden_size = 0
    if (Path(onnx_path).parent / "config.json").is_file():
        config = AutoConfig.from_pretrained(Path(onnx_path).parent)
        # attribute maps give DistilBERT's n_heads and dim these names
        num_heads, hidden_size = config.num_attention_heads, config.hidden_size
    try:
        model = optimize_model(
            str(onnx_path), "bert", num_heads, hidden_size, opt_level=0, only_onnxruntime=False
        )
        name_fused_nodes(model.model.graph)
        model.save_model_to_file(str(fused_path))
    except OSError:
        raise
    except Exception as error:  # the optimiser raises many types
        raise ExportError(
            f"onnxruntime's transformer optimiser failed on '{onnx_path}' ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); export without it: quantization.fuse=false."
        ) from error
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    log.info("fused operators before quantisation: %s", counts or "none")
    return counts


def name_fused_nodes(graph: Any) -> None:
    """Give the fused operators (named ``Attention_1``, ``SkipLayerNorm_AddBias_3`` ...) the scope
    of the layer they replace, taken from their output tensor's name, e.g.
    ``/model/bert/encoder/layer.1/attention/self/Attention``: a ``quantization.exclude`` pattern
    of a layer (``layer\\.1/``) then also keeps its fused attention fp32."""
    names = {node.name for node in graph.node}
    for node in graph.node:
        output = node.output[0] if node.output else ""
        if node.name.startswith("/") or not output.startswith("/") or "/" not in output[1:]:
            continue
        name = f"{output.rsplit('/', 1)[0]}/{node.op_type}"
        while name in names:
            name += "_"
        names.add(name)
        node.name = name


def _quantizer_warnings(record: logging.LogRecord) -> bool:
    """Keep the quantiser's warnings (it logs a line per tensor at INFO) but its hint to
    pre-process the model (shape inference, which matters for static quantisation of CNNs)."""
    return (
        record.levelno >= logging.WARNING
        and "pre-processing before quantization" not in record.getMessage()
    )


class RecordedLogits:
    """A model's logits, kept batch by batch in the order they were asked for."""

    def __init__(self, logits_fn: LogitsFn) -> None:
        self.logits_fn = logits_fn
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits_fn(batch)
        self.batches.append(logits)
        return logits


def compare_answers(
    tokenizer: Any,
    settings: Any,
    reference: LogitsFn,
    candidate: LogitsFn,
    questions: Sequence[str],
    contexts: Sequence[str],
    batch_size: int = 32,
) -> Agreement:
    """Answer the questions with both models (``predict``'s windowing, batching and decoding):
    how many best answers are the same, and the largest start/end logit difference."""
    recorded, answers = [], []
    for logits_fn in (reference, candidate):
        recording = RecordedLogits(logits_fn)
        answerer = QuestionAnswerer(tokenizer, recording, settings, batch_size)
        found = answerer.answer(list(questions), list(contexts))
        answers.append([(a[0].start, a[0].end) if a else None for a in found])
        recorded.append(recording.batches)
    diff, windows = 0.0, 0
    for ours, theirs in zip(*recorded, strict=True):  # the same batches in the same order
        windows += len(ours[0])
        for a, b in zip(ours, theirs, strict=True):
            diff = max(diff, float((a - b).abs().max()))
    same = sum(a == b for a, b in zip(*answers, strict=True))
    return Agreement(len(questions), windows, same, diff)


def sample_questions(path: str | Path, size: int, seed: int = 42) -> tuple[list[str], list[str]]:
    """Questions and contexts of ``size`` examples of a local SQuAD-format file, sampled as
    ``data.validation_samples`` samples (``shuffle(seed).select(range(size))``)."""
    from qa_lightning.data.loading import load_local_file

    examples = load_local_file(path)
    if size < len(examples):
        examples = examples.shuffle(seed=seed).select(range(size))
    return examples["question"][:], examples["context"][:]


def checkpoint_validation_file(ckpt_path: str | Path | None) -> str | None:
    """The local validation file a checkpoint's data module read, if it still exists."""
    if not ckpt_path:
        return None
    from qa_lightning.runs.checkpoint_reading import read_checkpoint

    data = read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {}
    path = data.get("validation_file")
    return str(path) if path and Path(path).is_file() else None


def check_quantize_config(cfg: DictConfig) -> QuantizationRecipe | None:
    """The recipe of ``quantize=int8`` (``None`` without ``quantize``), with the export keys it
    uses checked and the quantisation tools imported, before any model is loaded."""
    quantize = cfg.get("quantize")
    if quantize is None:
        return None
    if quantize not in QUANTIZE_TYPES:
        raise ConfigError(
            f"invalid config: quantize={quantize!r}; use quantize=int8, or leave it out (null) "
            "for the fp32 model."
        )
    if cfg.format != "onnx":
        raise ConfigError(
            f"quantize={quantize} quantises an ONNX export: give format=onnx (format="
            f"{cfg.format} has no quantised variant)."
        )
    recipe = QuantizationRecipe.from_config(cfg.get("quantization"))
    samples = cfg.get("validation_samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise ConfigError(
            f"invalid config: validation_samples={samples!r}; give the number of questions to "
            "compare int8 with fp32 on, e.g. validation_samples=300."
        )
    share = cfg.get("min_agreement")
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
        raise ConfigError(
            f"invalid config: min_agreement={share!r}; give a share in [0, 1], e.g. 0.95."
        )
    path = cfg.get("validation_file")
    if path and not Path(path).is_file():
        raise ConfigError(
            f"validation_file='{path}' is not a file (resolved to '{Path(path).resolve()}'); give "
            "a SQuAD json, jsonl or parquet file, or leave it out to use the checkpoint's."
        )
    quantization_tools()
    return recipe


def quantize_export(
    exported: Any, onnx_path: str | Path, recipe: QuantizationRecipe, cfg: DictConfig
) -> dict[str, Any]:
    """Replace the checked fp32 ``onnx_path`` of an export by its int8 quantisation and compare
    it with fp32 PyTorch (``exported.model``); returns the record for the export's settings."""
    onnx_path = Path(onnx_path)
    record = quantize_onnx(onnx_path, onnx_path, recipe)
    int8 = OnnxLogits(onnx_path)  # warns on CPUs without int8 dot products
    reference = TorchLogits(exported.model, "cpu", "32-true")
    validation_file = cfg.get("validation_file") or checkpoint_validation_file(cfg.get("ckpt_path"))
    if validation_file:
        questions, contexts = sample_questions(validation_file, cfg.validation_samples)
    else:
        from qa_lightning.serving.exports import CHECK_PAIRS

        log.warning(
            "no validation data to compare the int8 answers with fp32's: give "
            "validation_file=PATH (a SQuAD file); comparing %d example questions only",
            len(CHECK_PAIRS),
        )
        questions, contexts = (list(x) for x in zip(*CHECK_PAIRS, strict=True))
    agreement = compare_answers(
        exported.tokenizer, exported.settings, reference, int8, questions, contexts
    )
    record["agreement"] = {
        "reference": "fp32 PyTorch",
        "validation_file": str(validation_file) if validation_file else None,
        **asdict(agreement),
        "share": round(agreement.share, 4),
    }
    print(
        f"int8 quantised; against fp32 PyTorch on {agreement.questions} question(s) "
        f"({agreement.windows} windows) of {validation_file or 'the built-in examples'}: same "
        f"best answer for {agreement.same_best_answer}/{agreement.questions} "
        f"({100 * agreement.share:.1f}%), max abs start/end logit difference "
        f"{agreement.max_abs_logit_diff:.3g}"
    )
    if validation_file and agreement.share < cfg.min_agreement:
        log.warning(
            "the int8 model gives the fp32 model's best answer for only %.1f%% of %d questions "
            "(min_agreement=%s): score both with python -m qa_lightning.evaluate onnx_path=... "
            "and, if F1 drops, try another recipe (quantization.per_channel=true, "
            "quantization.exclude=[qa_outputs], fewer quantization.op_types) or serve the fp32 "
            "export.",
            100 * agreement.share,
            agreement.questions,
            cfg.min_agreement,
        )
    return {"quantization": record}
