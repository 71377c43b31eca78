"""SQuAD loading, record checks, windowing and the LightningDataModule.

``SquadDataModule`` is imported on first use, so that answering does not import ``datasets``."""

from typing import Any

__all__ = ["SquadDataModule"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qa_lightning.data import datamodule

        return datamodule.SquadDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
