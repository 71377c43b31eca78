"""The LightningModule."""

from qa_lightning.model.module import QAModule, load_qa_model

__all__ = ["QAModule", "load_qa_model"]
