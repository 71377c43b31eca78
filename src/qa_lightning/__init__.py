"""Fine-tune, evaluate and serve extractive question answering models."""

__version__ = "0.1.0"
