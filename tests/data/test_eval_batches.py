"""Validation batches: on a CPU, windows of one length each (unpadded); the same answers as
batches padded to their longest window."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.data import SquadDataModule
from tests.conftest import SHORT_WINDOWS


def datamodule(**settings) -> SquadDataModule:
    module = SquadDataModule(
        minilm_path(),
        dataset_name=None,
        validation_file=resource_path("demo/validation.json"),
        eval_batch_size=16,
        cache_dir=None,
        **SHORT_WINDOWS,
        **settings,
    )
    module.setup("validate")
    return module


def test_cpu_batches_hold_one_length_each_and_every_window_once() -> None:
    data = datamodule()  # eval_equal_length=None and no trainer (or a CPU trainer): equal length
    batches = list(data.val_dataloader())
    assert all(batch["attention_mask"].all() for batch in batches)  # nothing padded
    assert all(len(batch["input_ids"]) <= 16 for batch in batches)
    seen = Counter(i for batch in batches for i in batch["example_index"].tolist())
    assert seen == Counter(data.val_windows["example_index"])
    assert len({batch["input_ids"].shape[1] for batch in batches}) > 3


@pytest.mark.parametrize("setting", [False, None])
def test_padded_batches_when_switched_off_or_on_a_gpu(setting: bool | None) -> None:
    data = datamodule(eval_equal_length=setting)
    if setting is None:  # what the automatic choice sees under a GPU trainer
        data.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device("cuda")),
            distributed_sampler_kwargs=None,  # one device
        )
    batches = list(data.val_dataloader())
    assert [len(b["input_ids"]) for b in batches[:-1]] == [16] * (len(batches) - 1)
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
    assert not all(b["attention_mask"].all() for b in batches)


def test_equal_length_batches_give_the_padded_batches_answers(compose_train) -> None:
    torch.manual_seed(0)
    module = instantiate(compose_train(["model=tiny"]).model)  # conf/model/tiny.yaml
    results = []
    for setting in (True, False):
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.validate(module, datamodule=datamodule(eval_equal_length=setting), verbose=False)
        results.append((module.last_predictions, module.last_scores))
    (unpadded, unpadded_scores), (padded, padded_scores) = results
    assert len(unpadded) == 30 and unpadded == padded
    assert unpadded_scores == padded_scores
