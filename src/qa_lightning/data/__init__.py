"""SQuAD loading, record checks, windowing and the LightningDataModule."""

from qa_lightning.data.datamodule import SquadDataModule

__all__ = ["SquadDataModule"]
