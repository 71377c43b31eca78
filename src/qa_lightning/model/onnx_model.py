"""An ONNX export scored by ``trainer.validate`` like any checkpoint: ``QAModule`` with the model
run by onnxruntime on the CPU (``python -m qa_lightning.evaluate onnx_path=...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qa_lightning.model.logits import OnnxLogits
from qa_lightning.model.module import QAModule


class OnnxQAModel(torch.nn.Module):
    """``AutoModelForQuestionAnswering``'s call signature (model inputs as keywords -> outputs
    with ``start_logits`` and ``end_logits``) for an ONNX export run with onnxruntime.

    It has no parameters: onnxruntime holds the weights. Inputs on any device are run on the CPU
    and the logits are returned on the inputs' device.
    """

    def __init__(self, onnx_path: str | Path) -> None:
        super().__init__()
        self.onnx_path = str(onnx_path)
        self.session = OnnxLogits(onnx_path)

    def forward(self, **inputs: torch.Tensor) -> QuestionAnsweringModelOutput:
        device = next(iter(inputs.values())).device
        start_logits, end_logits = self.session({k: v.cpu() for k, v in inputs.items()})
        return QuestionAnsweringModelOutput(
            start_logits=start_logits.to(device), end_logits=end_logits.to(device)
        )


class OnnxQAModule(QAModule):
    """:class:`QAModule` (validation, post-processing, EM/F1) around an ONNX export.

    ``name_or_path`` is the export's directory (its tokenizer, for the data module); the other
    arguments are ``QAModule``'s (only the decoding ones matter: it cannot be trained).
    """

    def __init__(self, onnx_path: str, **module_args: Any) -> None:
        self.onnx_path = str(onnx_path)  # read by load_model, called by QAModule.__init__
        super().__init__(**module_args)

    def load_model(self, *args: Any) -> torch.nn.Module:
        return OnnxQAModel(self.onnx_path)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(
            "an ONNX model cannot be trained: train the PyTorch checkpoint and export it again."
        )
