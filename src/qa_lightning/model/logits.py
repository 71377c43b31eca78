"""Models as logits functions: a collated batch of windows -> ``(start_logits, end_logits)`` on the
CPU, run with PyTorch (fp32 or autocast) or with onnxruntime; the device and precision they run in.

A quantised ONNX model never sees padding or other windows: its logits of a window do not depend
on the batch it comes in (see :class:`OnnxLogits`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qa_lightning.core.config import auto_precision
from qa_lightning.core.errors import ConfigError
from qa_lightning.core.hardware import cpu_bf16_warning, cpu_int8_warning
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.model.packed import PackedLinear, pack_linear_layers

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("start_logits", "end_logits")
#: Metadata key of a quantised ONNX model: its recipe as JSON (:mod:`qa_lightning.serving.int8`).
QUANTIZATION_METADATA_KEY = "qa_lightning.quantization"
#: The logit of a padding position of a window run unpadded (:class:`OnnxLogits`): no span can
#: start or end there, nor take a place among a window's ``n_best`` starts or ends.
PADDING_LOGIT = float(np.finfo(np.float32).min)
#: ``precision`` of the PyTorch backend -> autocast dtype (``None``: fp32), as Lightning names them.
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class LogitsFn(Protocol):
    """A model: a collated batch of windows -> ``(start_logits, end_logits)`` on the CPU."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchLogits:
    """An ``AutoModelForQuestionAnswering`` run with PyTorch, in fp32 or under autocast
    (``precision``: a key of :data:`AUTOCAST_DTYPES`). With ``pack``, in fp32 on a CPU, the
    model's linear layers are packed for oneDNN in place
    (:func:`~qa_lightning.model.packed.pack_linear_layers`): for a model that serves this
    inference only (not traced, trained or saved afterwards)."""

    #: torch's intra-op threads for each call (``None``: as they are; see :meth:`with_threads`)
    threads: int | None = None

    def __init__(
        self,
        model: torch.nn.Module,
        device: str = "cpu",
        precision: str = "32-true",
        pack: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = AUTOCAST_DTYPES[precision]
        self.model = model.to(self.device).eval()
        if pack and self.device.type == "cpu" and self.dtype is None:
            pack_linear_layers(self.model)
        elif self.dtype is not None and any(isinstance(m, PackedLinear) for m in model.modules()):
            raise ValueError(
                f"this model was packed for fp32 on a CPU: load it again for {precision}"
            )

    def with_threads(self, threads: int, spin: bool = True) -> TorchLogits:
        """The same model (shared, not copied), called with ``threads`` intra-op threads
        (``spin`` is onnxruntime's: torch's OpenMP threads spin only briefly after a call)."""
        clone = copy.copy(self)
        clone.threads = threads
        return clone

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        inputs = {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
            outputs = self.model(**inputs)
        return outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu()


class OnnxLogits:
    """An ONNX export (see :mod:`qa_lightning.export`) run with onnxruntime: ``threads`` intra-op
    threads (``None``: onnxruntime's default, one per physical core), which keep spinning after a
    run unless ``spin`` is false (right when other processes want the cores).

    A quantised model (its recipe in the model's metadata, :data:`QUANTIZATION_METADATA_KEY`)
    answers each window as if it were asked alone, so that an answer does not depend on the
    other questions of a batch, their order or the padding: its windows are run without padding
    (trimmed to their attention mask; the padding positions get :data:`PADDING_LOGIT`), those of
    one length together when its activations' scales are fixed (``"activations": "static"``),
    and each window in a forward pass of its own when they are dynamic (onnxruntime quantises
    an operator's input with one scale per tensor, from the range of the whole batch).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
    ) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(
                "onnx_path needs onnxruntime: pip install 'qa-lightning[export]' (or answer "
                "with PyTorch: model_dir=PATH or ckpt_path=PATH)."
            ) from error
        try:
            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            if not spin:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(
                str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ConfigError(
                f"onnx_path='{onnx_path}' is not a model onnxruntime can load "
                f"({type(error).__name__}: {str(error).strip()[:200]}); export it again with "
                "python -m qa_lightning.export ckpt_path=... format=onnx."
            ) from error
        self.onnx_path, self.providers = onnx_path, providers
        self.input_names = [i.name for i in self.session.get_inputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        quantization = metadata.get(QUANTIZATION_METADATA_KEY)
        #: the recipe of a quantised export (``None``: fp32)
        self.quantization = json.loads(quantization) if quantization else None
        #: a quantised model's windows run unpadded (see above); ``False``: batches as they
        #: come, padding and all (what a benchmark compares with)
        self.unpadded = True
        if self.quantization and (warning := cpu_int8_warning(f"onnx_path='{onnx_path}' (int8)")):
            log.warning(warning)

    def with_threads(self, threads: int, spin: bool = True) -> OnnxLogits:
        """A session of the same model with ``threads`` intra-op threads (onnxruntime fixes
        them per session)."""
        return OnnxLogits(self.onnx_path, self.providers, threads, spin)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise ConfigError(
                f"the ONNX model needs input(s) {missing} that its tokenizer does not produce; "
                "export the ONNX model from the same model directory as the tokenizer."
            )
        feeds = {name: batch[name].numpy() for name in self.input_names}
        if self.quantization is None or not self.unpadded:
            start_logits, end_logits = self.session.run(list(OUTPUT_NAMES), feeds)
        else:
            start_logits, end_logits = self._run_unpadded(feeds, batch.get("attention_mask"))
        return torch.from_numpy(start_logits).float(), torch.from_numpy(end_logits).float()

    @property
    def dynamic(self) -> bool:
        """A quantised model whose activations are quantised at run time, from each batch's
        range (the recipes before ``activations`` were all dynamic)."""
        return bool(self.quantization) and self.quantization.get("activations") != "static"

    def _run_unpadded(
        self, feeds: dict[str, np.ndarray], attention_mask: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The logits of each window run without padding: alone (:attr:`dynamic`), else with
        the batch's other windows of its length; padding positions get :data:`PADDING_LOGIT`."""
        rows, length = next(iter(feeds.values())).shape
        lengths = (
            attention_mask.sum(1).numpy() if attention_mask is not None else np.full(rows, length)
        )
        start = np.full((rows, length), PADDING_LOGIT, dtype=np.float32)
        end = np.full((rows, length), PADDING_LOGIT, dtype=np.float32)
        if self.dynamic:
            groups = [np.array([row]) for row in range(rows)]
        else:
            groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)]
        for group in groups:
            real = int(lengths[group[0]])  # the collator pads on the right
            window = {name: np.ascontiguousarray(v[group, :real]) for name, v in feeds.items()}
            start[group, :real], end[group, :real] = self.session.run(list(OUTPUT_NAMES), window)
        return start, end


def resolve_device(device: str) -> str:
    """``auto``: the GPU when there is one, else the CPU; other values are checked to name a
    device torch knows and that this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"invalid config: device={device!r} is not a torch device; use auto, cpu, cuda or "
            "cuda:N."
        ) from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but this machine has no CUDA GPU that torch can use; use "
            "device=cpu (or device=auto)."
        )
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: what training defaults to on ``device`` (bf16-mixed on GPUs and on CPUs with
    native bf16, else fp32); other values are checked against :data:`AUTOCAST_DTYPES`."""
    if precision == "auto":
        return auto_precision(device)
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"invalid config: precision={precision!r}; use auto, {', '.join(AUTOCAST_DTYPES)}."
        )
    if warning := cpu_bf16_warning(torch.device(device).type, precision, "precision", "32-true"):
        log.warning(warning)
    return precision
