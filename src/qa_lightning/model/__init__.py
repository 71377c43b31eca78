"""The LightningModule (:mod:`qa_lightning.model.module`) and what answering needs of a model.

``QAModule`` and ``load_qa_model`` are imported on first use, so that answering (the server's
processes, ``predict`` with ONNX) does not import Lightning."""

from typing import Any

__all__ = ["QAModule", "load_qa_model"]


def __getattr__(name: str) -> Any:
    if name == "QAModule":
        from qa_lightning.model.module import QAModule

        return QAModule
    if name == "load_qa_model":
        from qa_lightning.model.loading import load_qa_model

        return load_qa_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
