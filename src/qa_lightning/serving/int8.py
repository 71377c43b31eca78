"""int8 ONNX exports for CPU serving: onnxruntime dynamic or static quantisation, and its agreement
with fp32.

    python -m qa_lightning.export ckpt_path=RUN/checkpoints/best-....ckpt format=onnx quantize=int8

Both store the weights of the chosen operators as int8 (per output channel or per tensor) and
quantise their inputs to uint8; everything else stays fp32. Static quantisation (the default)
fixes the scales at export, from the ranges calibrated on ``calibration_windows`` windows of
training questions (``calibration_method``), and quantises the operators' inputs with
``QuantizeLinear`` nodes (onnxruntime's QDQ format). Dynamic quantisation
(``quantization.activations=dynamic``) computes an input's scale at run time, per tensor, from
the range of what it is given, so :class:`~qa_lightning.model.logits.OnnxLogits` runs such a
model one window at a time: a question's answer does not depend on the others of its batch. Before
quantising, onnxruntime's transformer fusions put each layer's attention into one ``Attention``
operator: dynamic quantisation quantises it whole; static quantisation has no int8
``Attention``, so the fused attention stays fp32 there (``fuse=false`` leaves the attention as
MatMuls, quantised like the others). The recipe (``quantization.*`` in ``conf/export.yaml``)
decides speed and accuracy; the default, chosen by measurement, is static (percentile
calibration) and unfused: per-channel int8 weights of every MatMul of a weight (see
``docs/int8.md``). It is recorded under
``"quantization"`` in the export's ``qa_lightning.json`` and in the ONNX model's metadata, which
:class:`~qa_lightning.model.logits.OnnxLogits` reads to run the model and to warn on CPUs without
int8 dot products.

The export checks what ships: the fused fp32 graph against PyTorch (``atol``) before it is
quantised, then the int8 file's answers against fp32 PyTorch's on a sample of validation
questions (``validation_file``, by default the checkpoint's), in unpadded and padded batches. It
warns only on a real loss: F1 against the gold answers more than ``max_f1_drop`` points below
fp32's, or without gold answers a mean overlap F1 with fp32's answers below ``min_agreement``
(:func:`agreement_problem`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from qa_lightning.core.config import check_types
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.data.collate import MODEL_INPUTS
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
#: ``quantization.activations``: scales computed at run time from each input, or fixed at export.
ACTIVATIONS = ("dynamic", "static")
#: What static quantisation handles of :data:`DYNAMIC_OP_TYPES`. It has no int8 ``Attention``:
#: the fused attention stays fp32 (``fuse=false``: the attention's MatMuls are quantised).
STATIC_OP_TYPES = ("MatMul", "Attention", "Gather", "Conv", "Transpose")
#: ``quantization.calibration_method`` -> onnxruntime's ``CalibrationMethod`` (the ranges of
#: static activations: the largest seen, a percentile (99.999) of the absolute values, or the
#: threshold that loses the least information, by KL divergence).
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: The seed of the sample of calibration questions (not the agreement check's 42, which the
#: validation file may also give).
CALIBRATION_SEED = 0
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
    :func:`name_fused_nodes`); a pattern that matches no node stops the export;
    ``activations``: ``dynamic`` (scales at run time) or ``static`` (scales calibrated at export
    on ``calibration_windows`` windows of ``calibration_file``, by default the checkpoint's
    training file, with ``calibration_method``: ``minmax``, ``percentile`` or ``entropy``).
    """

    fuse: bool = False
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
    activations: str = "static"
    calibration_method: str = "percentile"
    calibration_windows: int = 256
    calibration_file: str | None = None

    def __post_init__(self) -> None:
        check_types(asdict(self), QuantizationRecipe, "quantization.")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(
                f"invalid config: quantization.activations={self.activations!r}; use dynamic "
                "(scales from each window at run time) or static (scales calibrated at export)."
            )
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"invalid config: quantization.calibration_method={self.calibration_method!r}; "
                f"use one of {list(CALIBRATION_METHODS)}."
            )
        if self.calibration_windows <= 0:
            raise ConfigError(
                f"invalid config: quantization.calibration_windows={self.calibration_windows}; "
                "give the number of windows to calibrate static scales on, e.g. 256."
            )
        handled = STATIC_OP_TYPES if self.activations == "static" else DYNAMIC_OP_TYPES
        unknown = [op for op in self.op_types if op not in handled]
        if not self.op_types or unknown:
            raise ConfigError(
                f"invalid config: quantization.op_types={list(self.op_types)!r}; give a "
                f"non-empty list of operator types that {self.activations} quantisation "
                f"handles: {list(handled)} (e.g. quantization.op_types=[MatMul])."
            )
        if self.activations == "static" and set(self.op_types) == {"Attention"}:
            raise ConfigError(
                "invalid config: quantization.op_types=['Attention'] with "
                "quantization.activations=static quantises nothing: static quantisation has no "
                "int8 Attention operator; give quantization.op_types=[MatMul, Attention]."
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
    """A candidate model's answers (and logits) against a reference model's on the same
    questions, as ``predict`` answers them.

    ``answer_f1``: the mean SQuAD F1 (token overlap, 0-100) of the candidate's best answer
    against the reference's; ``in_reference_top3``: the share of candidate best answers among
    the reference's 3 best; ``reference_scores``/``candidate_scores``: EM/F1 of each against the
    gold answers (``None`` without them). These come from batches of one length (unpadded, as
    ``predict`` on a CPU); ``padded_answer_f1`` and ``padded_candidate_scores`` from length-sorted
    batches padded to a multiple of 8 (``padded_windows`` of them carry padding), which exercise
    the attention mask. ``max_abs_logit_diff``: over the real tokens of both.
    """

    questions: int
    windows: int
    padded_windows: int
    same_best_answer: int
    in_reference_top3: float
    answer_f1: float
    max_abs_logit_diff: float
    reference_scores: dict[str, float] | None = None
    candidate_scores: dict[str, float] | None = None
    padded_answer_f1: float | None = None
    padded_candidate_scores: dict[str, float] | None = None

    @property
    def share(self) -> float:
        """The share of best answers that are the same span."""
        return self.same_best_answer / self.questions if self.questions else 1.0

    @property
    def f1_drop(self) -> float | None:
        """How many F1 points (against the gold answers) the candidate loses; the larger of its
        unpadded and padded answers. ``None`` without gold answers."""
        if self.reference_scores is None or self.candidate_scores is None:
            return None
        scores = [self.candidate_scores, self.padded_candidate_scores]
        worst = min(s["f1"] for s in scores if s is not None)
        return round(self.reference_scores["f1"] - worst, 4)


def agreement_problem(agreement: Agreement, min_agreement: float, max_f1_drop: float) -> str | None:
    """Why the candidate's answers are worse than the reference's, or ``None``.

    With gold answers: an F1 more than ``max_f1_drop`` points lower (a changed answer that is as
    right is no loss). Without: a mean answer overlap F1 (unpadded or padded) below
    ``min_agreement``. Another best span of the same answer, or a near one, is not an alarm.
    """
    drop = agreement.f1_drop
    if drop is not None:
        if drop > max_f1_drop:
            return (
                f"F1 {drop:.2f} points below fp32's on {agreement.questions} labelled questions "
                f"(max_f1_drop={max_f1_drop})"
            )
        return None
    overlap = min(f for f in (agreement.answer_f1, agreement.padded_answer_f1) if f is not None)
    if overlap < 100 * min_agreement:
        return (
            f"answers with an overlap F1 of {overlap:.1f}% with fp32's on {agreement.questions} "
            f"questions without gold answers (min_agreement={min_agreement})"
        )
    return None


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


@dataclass(frozen=True)
class Calibration:
    """What static quantisation calibrates its scales on: ``windows``, the model inputs of one
    window each (unpadded, int64 arrays of shape ``(1, tokens)``), from the questions of
    ``file``."""

    file: str
    windows: list[dict[str, np.ndarray]]


def calibration_windows(
    tokenizer: Any, settings: Any, path: str | Path, size: int, seed: int = CALIBRATION_SEED
) -> Calibration:
    """Up to ``size`` windows of a sample of the questions of a local SQuAD-format file,
    windowed as ``predict`` windows them (``settings``: max_length, stride,
    max_question_tokens)."""
    from qa_lightning.data.windowing import make_eval_windows, truncate_questions

    questions, contexts, _ = sample_questions(path, size, seed)
    questions, _ = truncate_questions(tokenizer, questions, settings.max_question_tokens)
    windows = make_eval_windows(
        tokenizer, questions, contexts, settings.max_length, settings.stride
    )
    names = [name for name in MODEL_INPUTS if name in windows]
    count = min(size, len(windows["input_ids"]))
    inputs = [{k: np.asarray([windows[k][i]], dtype=np.int64) for k in names} for i in range(count)]
    return Calibration(str(path), inputs)


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` over :class:`Calibration` windows, which it reads
    ``set_range`` by ``set_range`` (one window each: windows of several lengths cannot share
    one histogram update, and one at a time holds one window's activations in memory)."""

    def __init__(self, windows: list[dict[str, np.ndarray]], input_names: list[str]) -> None:
        self.windows = [{k: w[k] for k in input_names} for w in windows]
        self.set_range(0, len(self.windows))

    def __len__(self) -> int:
        return len(self.windows)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self.windows[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    recipe: QuantizationRecipe,
    check_fused: Callable[[Path], Any] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Quantise ``fp32_path`` into ``int8_path`` (int8 weights, uint8 activations quantised at
    run time, or with ``recipe.activations == "static"`` with scales calibrated on
    ``calibration``), after :func:`fuse_transformer_graph` with ``recipe.fuse``; the recipe, as
    recorded in the model's metadata, is returned. ``check_fused`` is called with the fused
    fp32 graph, the one quantised, before it is (it raises to stop)."""
    tools = quantization_tools()
    import onnx
    import onnxruntime

    static = recipe.activations == "static"
    if static and not (calibration and calibration.windows):
        raise ExportError(
            "static quantisation needs calibration windows (quantization.calibration_file): "
            "none were given."
        )
    int8_path = Path(int8_path)
    fused = int8_path.with_name(int8_path.name + ".fused")
    partial = int8_path.with_name(int8_path.name + ".part")
    record: dict[str, Any] = {
        "type": "int8",
        "method": "onnxruntime dynamic quantisation: int8 weights, uint8 activations "
        "quantised at run time, each window alone",
        **asdict(recipe),
        "op_types": list(recipe.op_types),
        "exclude": list(recipe.exclude),
        "onnxruntime": onnxruntime.__version__,
    }
    if static:
        record["method"] = (
            "onnxruntime static quantisation (QDQ): int8 weights, uint8 activations with "
            f"scales calibrated ({recipe.calibration_method}) on {len(calibration.windows)} "
            "windows"
        )
        record["calibration_file"] = calibration.file
    else:  # the calibration keys say nothing about a dynamic model
        for key in ("calibration_method", "calibration_windows", "calibration_file"):
            del record[key]
    root = logging.getLogger()  # onnxruntime's quantiser logs to the root logger
    root.addFilter(_quantizer_warnings)
    try:
        source = fp32_path
        if recipe.fuse:
            record["fused_operators"] = fuse_transformer_graph(fp32_path, fused)
            source = fused
            if check_fused is not None:
                check_fused(fused)
        record["excluded_nodes"] = exclude = excluded_nodes(source, recipe.exclude)
        if static:
            if recipe.fuse:  # types of the fused operators' outputs, which ONNX cannot infer
                infer_fused_types(fused)
            quantize_static(tools, source, partial, recipe, exclude, calibration)
            if recipe.fuse and "Attention" in recipe.op_types:
                record["method"] += "; the fused Attention operators stay fp32"
        else:
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
        if shutil.disk_usage(int8_path.parent).free < Path(fp32_path).stat().st_size:
            # its shape inference writes a copy of the model beside it, and a full disk leaves
            # that copy cut short without an error: it fails when read back
            raise OSError(errno.ENOSPC, f"no room for onnxruntime's copies ({error})") from error
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


def quantize_static(
    tools: ModuleType,
    source: Path | str,
    int8_path: Path,
    recipe: QuantizationRecipe,
    exclude: Sequence[str],
    calibration: Calibration,
) -> None:
    """onnxruntime's static quantisation of ``source`` into ``int8_path`` (QDQ format, which
    onnxruntime's CPU kernels fuse into int8 operators): per-channel (``recipe.per_channel``)
    int8 weights, uint8 activations (as dynamic quantisation, which CPUs without VNNI need), with
    the activations' ranges of the calibration windows. As in dynamic quantisation, only the
    MatMuls of a weight (not the attention's products of two activations) are quantised, and
    their outputs stay fp32."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    # the QDQ quantiser ignores its MatMulConstBOnly option: these are excluded by name
    products = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    inputs = [i.name for i in graph.input if i.name not in weights]
    reader = _CalibrationReader(calibration.windows, inputs)
    method = getattr(tools.CalibrationMethod, CALIBRATION_METHODS[recipe.calibration_method])
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
        tools.quantize_static(
            str(source),
            str(int8_path),
            reader,
            quant_format=tools.QuantFormat.QDQ,
            op_types_to_quantize=[op for op in recipe.op_types if op != "Attention"],
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=tools.QuantType.QUInt8,
            weight_type=tools.QuantType.QInt8,
            nodes_to_exclude=[*exclude, *products],
            calibrate_method=method,
            extra_options={
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
                "CalibStridedMinMax": 1,  # one window a collection: see _CalibrationReader
                "DefaultTensorType": onnx.TensorProto.FLOAT,
            },
        )


def infer_fused_types(onnx_path: Path) -> None:
    """Add the shapes and types of every tensor of a fused graph (onnxruntime's symbolic shape
    inference, which knows its fused operators) to the file, so that static quantisation finds
    the MatMuls after them (without, it leaves them fp32)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        model = SymbolicShapeInference.infer_shapes(onnx.load(str(onnx_path)), auto_merge=True)
    except Exception as error:  # the inference raises many types
        raise ExportError(
            f"onnxruntime's shape inference failed on the fused graph ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); quantise the unfused graph: quantization.fuse=false."
        ) from error
    onnx.save(model, str(onnx_path))


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
    """A model's logits, kept batch by batch in the order they were asked for, with the batch's
    attention mask (which tokens are real)."""

    def __init__(self, logits_fn: LogitsFn) -> None:
        self.logits_fn = logits_fn
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.logits_fn(batch)
        self.batches.append((batch["attention_mask"].bool(), start, end))
        return start, end


def _answer_both(
    tokenizer: Any,
    settings: Any,
    models: tuple[LogitsFn, LogitsFn],
    questions: Sequence[str],
    contexts: Sequence[str],
    batch_size: int,
    equal_length: bool,
) -> tuple[list[list[Any]], list[list[Any]], float, int, int]:
    """Both models' top 3 answers, the largest logit difference on real tokens, the number of
    windows and of windows in batches with padding."""
    recorded, answers = [], []
    for logits_fn in models:
        recording = RecordedLogits(logits_fn)
        answerer = QuestionAnswerer(tokenizer, recording, settings, batch_size, equal_length)
        answers.append(answerer.answer(list(questions), list(contexts), top_k=3))
        recorded.append(recording.batches)
    diff, windows, padded = 0.0, 0, 0
    for ours, theirs in zip(*recorded, strict=True):  # the same batches in the same order
        mask = ours[0]
        windows += len(mask)
        padded += len(mask) if not bool(mask.all()) else 0
        for a, b in zip(ours[1:], theirs[1:], strict=True):
            if bool(mask.any()):
                diff = max(diff, float((a - b).abs()[mask].max()))
    return answers[0], answers[1], diff, windows, padded


def _span(found: list[Any]) -> set[tuple[int, int]]:
    """The (start, end) of the answers ``found``."""
    return {(a.start, a.end) for a in found}


def _best_text(found: list[Any]) -> str:
    return found[0].text if found else ""


def _overlap_f1(reference: list[list[Any]], candidate: list[list[Any]]) -> float:
    from qa_lightning.answers.metrics import f1_score

    pairs = list(zip(reference, candidate, strict=True))
    total = sum(f1_score(_best_text(c), _best_text(r)) for r, c in pairs)
    return round(100.0 * total / len(pairs), 4) if pairs else 100.0


def _gold_scores(found: list[list[Any]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    from qa_lightning.answers.metrics import squad_v1_scores

    predictions = {str(i): _best_text(f) for i, f in enumerate(found)}
    references = {str(i): list(texts) or [""] for i, texts in enumerate(gold)}
    return {k: round(v, 4) for k, v in squad_v1_scores(predictions, references).items()}


def compare_answers(
    tokenizer: Any,
    settings: Any,
    reference: LogitsFn,
    candidate: LogitsFn,
    questions: Sequence[str],
    contexts: Sequence[str],
    gold: Sequence[Sequence[str]] | None = None,
    batch_size: int = 32,
) -> Agreement:
    """Answer the questions with both models (``predict``'s windowing, batching and decoding),
    twice: in unpadded batches of one length (as on a CPU) and in padded length-sorted batches
    (as on a GPU or a batching server); see :class:`Agreement`. ``gold``: each question's gold
    answer texts, to score both models (``[]``: unanswerable)."""
    models = (reference, candidate)
    ours, theirs, diff, windows, _ = _answer_both(
        tokenizer, settings, models, questions, contexts, batch_size, equal_length=True
    )
    padded_ours, padded_theirs, padded_diff, _, padded = _answer_both(
        tokenizer, settings, models, questions, contexts, batch_size, equal_length=False
    )
    pairs = list(zip(ours, theirs, strict=True))
    same = sum(_span(r[:1]) == _span(c[:1]) for r, c in pairs)
    top3 = sum(_span(c[:1]) <= {(a.start, a.end) for a in r} if c else not r for r, c in pairs)
    return Agreement(
        questions=len(questions),
        windows=windows,
        padded_windows=padded,
        same_best_answer=same,
        in_reference_top3=round(top3 / len(questions), 4) if questions else 1.0,
        answer_f1=_overlap_f1(ours, theirs),
        max_abs_logit_diff=max(diff, padded_diff),
        reference_scores=_gold_scores(ours, gold) if gold is not None else None,
        candidate_scores=_gold_scores(theirs, gold) if gold is not None else None,
        padded_answer_f1=_overlap_f1(padded_ours, padded_theirs),
        padded_candidate_scores=_gold_scores(padded_theirs, gold) if gold is not None else None,
    )


def sample_questions(
    path: str | Path, size: int, seed: int = 42
) -> tuple[list[str], list[str], list[list[str]]]:
    """Questions, contexts and gold answer texts of ``size`` examples of a local SQuAD-format
    file, sampled as ``data.validation_samples`` samples (``shuffle(seed).select(range(size))``)."""
    from qa_lightning.data.loading import load_local_file

    examples = load_local_file(path)
    if size < len(examples):
        examples = examples.shuffle(seed=seed).select(range(size))
    gold = [list(answers["text"]) for answers in examples["answers"][:]]
    return examples["question"][:], examples["context"][:], gold


def checkpoint_data_file(ckpt_path: str | Path | None, key: str) -> str | None:
    """The local data file (``key``: ``train_file``, ``validation_file``) a checkpoint's data
    module read, if it still exists."""
    if not ckpt_path:
        return None
    from qa_lightning.runs.checkpoint_reading import read_checkpoint

    data = read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {}
    path = data.get(key)
    return str(path) if path and Path(path).is_file() else None


def calibration_file(cfg: DictConfig, recipe: QuantizationRecipe) -> str:
    """The questions static quantisation calibrates on: ``quantization.calibration_file``, else
    the checkpoint's training file, else the validation file (``validation_file``, else the
    checkpoint's); a :class:`ConfigError` when there is none."""
    ckpt_path = cfg.get("ckpt_path")
    found = (
        recipe.calibration_file
        or checkpoint_data_file(ckpt_path, "train_file")
        or cfg.get("validation_file")
        or checkpoint_data_file(ckpt_path, "validation_file")
    )
    if not found:
        where = (
            "the checkpoint's training and validation files are not local files that exist here"
            if ckpt_path
            else "model_dir= has none"
        )
        raise ConfigError(
            "quantize=int8 calibrates the activations' scales on training questions "
            "(quantization.activations=static, the default), but there is no local file of them "
            f"({where}): give quantization.calibration_file=PATH (a SQuAD json, jsonl or parquet "
            "file of training questions), or quantise with scales computed at run time "
            "(quantization.activations=dynamic: faster to export, less accurate)."
        )
    return str(found)


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
            f"invalid config: min_agreement={share!r}; give a share in [0, 1], e.g. 0.9."
        )
    drop = cfg.get("max_f1_drop", 1.0)
    if not isinstance(drop, int | float) or isinstance(drop, bool) or not 0 <= drop <= 100:
        raise ConfigError(
            f"invalid config: max_f1_drop={drop!r}; give F1 points in [0, 100], e.g. 1.0."
        )
    for key, path in (
        ("validation_file", cfg.get("validation_file")),
        ("quantization.calibration_file", recipe.calibration_file),
    ):
        if path and not Path(path).is_file():
            raise ConfigError(
                f"{key}='{path}' is not a file (resolved to '{Path(path).resolve()}'); give a "
                "SQuAD json, jsonl or parquet file, or leave it out to use the checkpoint's."
            )
    quantization_tools()
    if recipe.activations == "static":
        recipe = replace(recipe, calibration_file=calibration_file(cfg, recipe))
    return recipe


#: The names of the checks recorded under ``quantization.checks``: what was measured on which
#: file, against what.
FUSED_CHECK = "fused fp32 graph vs fp32 PyTorch"
INT8_CHECK = "int8 model.onnx vs fp32 PyTorch"


def check_fused_graph(exported: Any, fused_path: Path, atol: float) -> dict[str, Any]:
    """The fused fp32 graph (the one quantised) against PyTorch on the export's padded and
    unpadded check batches: an :class:`ExportError` when its logits differ by more than
    ``atol`` (a fusion that broke the model)."""
    from qa_lightning.serving.exports import onnx_max_abs_diff

    diff = onnx_max_abs_diff(exported, fused_path)
    if diff > atol:
        raise ExportError(
            f"the fused graph's logits differ from PyTorch's by up to {diff:.2e}, more than "
            f"atol={atol}: onnxruntime's transformer fusion does not reproduce this model, and "
            "its int8 quantisation would not either; nothing was written. Export without the "
            "fusion (quantization.fuse=false)."
        )
    return {"max_abs_logit_diff": diff, "atol": atol}


def quantize_export(
    exported: Any, onnx_path: str | Path, recipe: QuantizationRecipe, cfg: DictConfig
) -> dict[str, Any]:
    """Replace the checked fp32 ``onnx_path`` of an export by its int8 quantisation; check the
    fused graph (with ``recipe.fuse``, see :func:`check_fused_graph`) and the int8 file itself
    against fp32 PyTorch (``exported.model``), in unpadded and padded batches; returns the record
    for the export's settings (``checks``: what was measured on which file)."""
    onnx_path = Path(onnx_path)
    checks: dict[str, Any] = {}

    def check_fused(fused: Path) -> None:
        checks[FUSED_CHECK] = check_fused_graph(exported, fused, cfg.atol)

    calibration = None
    if recipe.activations == "static":
        calibration = calibration_windows(
            exported.tokenizer,
            exported.settings,
            recipe.calibration_file or calibration_file(cfg, recipe),
            recipe.calibration_windows,
        )
    record = quantize_onnx(onnx_path, onnx_path, recipe, check_fused, calibration)
    int8 = OnnxLogits(onnx_path)  # warns on CPUs without int8 dot products
    reference = TorchLogits(exported.model, "cpu", "32-true")
    validation_file = cfg.get("validation_file") or checkpoint_data_file(
        cfg.get("ckpt_path"), "validation_file"
    )
    if validation_file:
        questions, contexts, gold = sample_questions(validation_file, cfg.validation_samples)
    else:
        from qa_lightning.serving.exports import CHECK_PAIRS

        log.warning(
            "no validation data to compare the int8 answers with fp32's: give "
            "validation_file=PATH (a SQuAD file); comparing %d example questions only",
            len(CHECK_PAIRS),
        )
        questions, contexts = (list(x) for x in zip(*CHECK_PAIRS, strict=True))
        gold = None
    agreement = compare_answers(
        exported.tokenizer, exported.settings, reference, int8, questions, contexts, gold
    )
    record["agreement"] = {
        "reference": "fp32 PyTorch",
        "validation_file": str(validation_file) if validation_file else None,
        **asdict(agreement),
        "share": round(agreement.share, 4),
        "f1_drop": agreement.f1_drop,
    }
    checks[INT8_CHECK] = {
        "max_abs_logit_diff": agreement.max_abs_logit_diff,
        "answer_f1": agreement.answer_f1,
        "padded_answer_f1": agreement.padded_answer_f1,
        "f1_drop": agreement.f1_drop,
    }
    record["checks"] = checks
    where = validation_file or "the built-in examples"
    if calibration is not None:
        print(
            f"calibrated the static int8 activation scales ({recipe.calibration_method}) on "
            f"{len(calibration.windows)} windows of {calibration.file}"
        )
    if FUSED_CHECK in checks:
        print(
            f"checked the {FUSED_CHECK}: max abs start/end logit difference "
            f"{checks[FUSED_CHECK]['max_abs_logit_diff']:.2e} (atol={cfg.atol})"
        )
    scores = (
        f"; F1 against the gold answers {agreement.candidate_scores['f1']:.2f} (padded batches "
        f"{agreement.padded_candidate_scores['f1']:.2f}) against fp32's "
        f"{agreement.reference_scores['f1']:.2f}"
        if agreement.reference_scores
        else ""
    )
    print(
        f"checked the {INT8_CHECK} on {agreement.questions} question(s) of {where} "
        f"({agreement.windows} windows unpadded, {agreement.padded_windows} in padded batches): "
        f"answer overlap F1 {agreement.answer_f1:.1f}% (padded batches "
        f"{agreement.padded_answer_f1:.1f}%), same best answer for "
        f"{agreement.same_best_answer}/{agreement.questions}, int8 best answer in fp32's top 3 "
        f"for {100 * agreement.in_reference_top3:.1f}%{scores}; max abs start/end logit "
        f"difference {agreement.max_abs_logit_diff:.3g}"
    )
    problem = agreement_problem(agreement, cfg.min_agreement, cfg.get("max_f1_drop", 1.0))
    if problem:
        log.warning(
            "the int8 model gives %s: check it with python -m qa_lightning.evaluate "
            "onnx_path=... and try another recipe (quantization.exclude=[qa_outputs], "
            "quantization.exclude=['layer\\.\\d+/output/dense/'], fewer quantization.op_types) "
            "or serve the fp32 export.",
            problem,
        )
    return {"quantization": record}
