"""LightningDataModule for SQuAD-format extractive QA: loading, checking, windowing, batching."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from qa_lightning.core.errors import ConfigError
from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data import cache
from qa_lightning.data.collate import WindowCollator
from qa_lightning.data.empty import drop_reasons, require_examples
from qa_lightning.data.loading import load_hub_split, load_local_file
from qa_lightning.data.readers import Reader
from qa_lightning.data.records import OnBadRecord, check_records
from qa_lightning.data.sampling import (
    DistributedBatchSampler,
    LengthGroupedSampler,
    ResumableDataLoader,
    SeededRandomSampler,
    SortedBatchSampler,
)
from qa_lightning.data.windowing import make_eval_windows, make_train_windows, truncate_questions

log = logging.getLogger(__name__)


class SquadDataModule(L.LightningDataModule):
    """SQuAD from the hub (``dataset_name``) or local files (``train_file``/``validation_file``,
    read by ``reader``: by default SQuAD json/jsonl/parquet by extension, see
    :mod:`qa_lightning.data.readers`).

    Sample sizes count questions (examples), never windows; the sample is drawn with
    ``Dataset.shuffle(seed=sample_seed)``, independent of the training seed. Validation batches
    hold windows sorted by length; with ``eval_equal_length`` (``None``: when running on a CPU)
    each holds windows of one length, so that nothing is padded.

    Under data parallelism the module shards its loaders itself (the trainer runs with
    ``use_distributed_sampler=False``): each rank gets whole training batches of one global,
    length-grouped order, and its share of the validation windows. ``prepare_data`` tokenises
    once per machine into the window cache (``cache_dir``), from which ``setup`` on every rank
    loads them.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        dataset_name: str | None = "squad",
        dataset_config: str | None = None,
        train_split: str = "train",
        validation_split: str = "validation",
        train_file: str | None = None,
        validation_file: str | None = None,
        reader: Reader | None = None,
        train_samples: int | None = None,
        validation_samples: int | None = None,
        sample_seed: int = 42,
        max_length: int = 384,
        stride: int = 128,
        max_question_tokens: int = 64,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        group_by_length: bool = True,
        pad_to_max_length: bool = False,
        pad_to_multiple_of: int | None = 8,
        eval_equal_length: bool | None = None,
        sampler_seed: int = 42,
        num_workers: int = 0,
        num_proc: int | None = None,
        on_bad_record: OnBadRecord = "error",
        version_2_with_negative: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        # the reader stays out of checkpoints (it would pickle Hydra's wrapper class); the run
        # dir's config_resolved.yaml records it
        self.save_hyperparameters(ignore=["reader"], logger=False)  # logged by hparams_summary
        self.reader = reader
        self.tokenizer: Any = None
        self.train_windows: datasets.Dataset | None = None
        self.val_windows: datasets.Dataset | None = None
        self.val_examples: datasets.Dataset | None = None
        self.num_train_examples = 0
        self.skipped: dict[str, dict[str, str]] = {}

    # -- loading -------------------------------------------------------------------------------

    def load_examples(self, split: str) -> datasets.Dataset:
        """Checked (and possibly sampled) examples of ``"train"`` or ``"validation"``."""
        hp = self.hparams
        data_file = hp.train_file if split == "train" else hp.validation_file
        samples = hp.train_samples if split == "train" else hp.validation_samples
        if data_file:
            source = f"'{data_file}'"
            examples = load_local_file(data_file, self.reader)
        elif hp.dataset_name:
            hub_split = hp.train_split if split == "train" else hp.validation_split
            source = f"hub dataset '{hp.dataset_name}' split '{hub_split}'"
            examples = load_hub_split(hp.dataset_name, hp.dataset_config, hub_split)
        else:
            raise ConfigError(
                f"no {split} data: set data.{split}_file=PATH or data.dataset_name (e.g. squad)."
            )
        what = "training questions" if split == "train" else "validation questions"
        require_examples(examples, what, source, "reading it", {})
        ids = examples["id"][:]
        examples, self.skipped[split] = check_records(
            examples, source, hp.on_bad_record, allow_unanswerable=hp.version_2_with_negative
        )
        option = f"data.on_bad_record={hp.on_bad_record}"
        require_examples(examples, what, source, option, drop_reasons(ids, self.skipped[split]))
        if samples is not None:
            if samples > len(examples):
                raise ConfigError(
                    f"data.{split}_samples={samples} is larger than the {len(examples)} questions "
                    f"of {source}; lower it, or set it to null to use them all."
                )
            examples = examples.shuffle(seed=hp.sample_seed).select(range(samples))
            require_examples(examples, what, source, f"data.{split}_samples={samples}", {})
        return examples.flatten_indices()

    def _truncate_long_questions(self, examples: datasets.Dataset) -> datasets.Dataset:
        limit = self.hparams.max_question_tokens
        questions, cut = truncate_questions(self.tokenizer, examples["question"][:], limit)
        if not cut:
            return examples
        ids = [examples[i]["id"] for i in cut[:10]]
        log.warning(
            "%d question(s) longer than data.max_question_tokens=%d tokens were truncated "
            "(ids %s%s)",
            len(cut),
            limit,
            ids,
            " ..." if len(cut) > 10 else "",
        )
        return examples.remove_columns("question").add_column("question", questions)

    # -- windowing -----------------------------------------------------------------------------

    def windows(self, examples: datasets.Dataset, train: bool) -> datasets.Dataset:
        """Tokenised windows of ``examples`` (long questions cut), from the cache when present."""
        hp = self.hparams
        key = cache.cache_key(
            kind="train" if train else "eval",
            examples=cache.examples_fingerprint(examples),
            tokenizer=cache.tokenizer_fingerprint(self.tokenizer),
            max_length=hp.max_length,
            stride=hp.stride,
            max_question_tokens=hp.max_question_tokens,
            pad_to_max_length=hp.pad_to_max_length,
        )
        make = partial(
            _map_windows, self.tokenizer, train, hp.max_length, hp.stride, hp.pad_to_max_length
        )

        def build() -> datasets.Dataset:
            log.info("tokenising %d %s questions", len(examples), "train" if train else "eval")
            return self._truncate_long_questions(examples).map(
                make,
                batched=True,
                with_indices=True,
                remove_columns=examples.column_names,
                num_proc=hp.num_proc,
                new_fingerprint=key,
                desc=f"windowing {'train' if train else 'validation'} examples",
            )

        def checked_build() -> datasets.Dataset:
            windows = build()
            require_examples(
                windows,
                "windows",
                f"the {len(examples)} {'training' if train else 'validation'} questions",
                f"windowing (data.max_length={hp.max_length}, data.stride={hp.stride})",
                {},
            )
            return windows

        return cache.cached(hp.cache_dir, key, checked_build)

    def prepare_data(self, stage: str | None = None) -> None:
        """Tokenises the windows that ``stage`` (default: the trainer's, else ``"fit"``) needs
        into the cache, once per machine: Lightning calls this on each machine's first process
        only, before ``setup`` on every process, which then loads the cached windows.

        The windows also stay in this process's memory for its own ``setup``. Without a cache
        (``cache_dir=None``) the other processes tokenise the data again in ``setup``.
        """
        if stage is None:
            validating = self.trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING
            stage = "validate" if validating else "fit"
        if self.hparams.cache_dir is None and self._world()[0] > 1:
            log.warning(
                "data.cache_dir is null: each of the %d processes tokenises the data itself; set "
                "paths.cache_dir=DIR to tokenise once per machine.",
                self._world()[0],
            )
        self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path)
        if stage in (None, "fit") and self.train_windows is None:
            examples = self.load_examples("train")
            self.num_train_examples = len(examples)
            self.train_windows = self.windows(examples, train=True)
            log.info("train: %d questions -> %d windows", len(examples), len(self.train_windows))
        if stage in (None, "fit", "validate") and self.val_windows is None:
            self.val_examples = self.load_examples("validation")
            windows = self.windows(self.val_examples, train=False)
            # sorted, so that DDP's every-n-th-window shards get alike shares of long windows;
            # the order is kept in memory (Dataset.sort writes it beside the verified cache entry)
            order = np.argsort(-np.asarray(windows["length"][:]), kind="stable")
            self.val_windows = windows.select(order, keep_in_memory=True)
            log.info("validation: %d questions -> %d windows", len(self.val_examples), len(windows))

    # -- loaders -------------------------------------------------------------------------------

    def _collator(self, equal_length: bool = False) -> WindowCollator:
        hp = self.hparams
        multiple = None if hp.pad_to_max_length or equal_length else hp.pad_to_multiple_of
        return WindowCollator(self.tokenizer.pad_token_id, multiple)

    def _eval_equal_length(self) -> bool:
        """``eval_equal_length``, or when ``None``: on a CPU, where cost follows the token count
        (a GPU prefers fewer, fuller batches)."""
        if self.hparams.eval_equal_length is not None:
            return self.hparams.eval_equal_length
        return self.trainer is None or self.trainer.strategy.root_device.type == "cpu"

    def _world(self) -> tuple[int, int]:
        """(number of data-parallel ranks, this process's rank), as Lightning would shard."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = self.train_windows.remove_columns(["example_index"])
        num_replicas, rank = self._world()
        # one global order per (seed, epoch); each rank takes every num_replicas-th whole batch
        order = (
            LengthGroupedSampler(
                windows["length"], hp.batch_size, seed=hp.sampler_seed, longest_first=num_replicas
            )
            if hp.group_by_length
            else SeededRandomSampler(len(windows), seed=hp.sampler_seed)
        )
        batches = DistributedBatchSampler(
            order, hp.batch_size, num_replicas=num_replicas, rank=rank
        )
        # resumable mid-epoch; its own generator keeps epoch starts off the global RNG (dropout)
        return ResumableDataLoader(
            windows.remove_columns(["length"]),
            batch_sampler=batches,
            generator=torch.Generator().manual_seed(hp.sampler_seed),
            collate_fn=self._collator(),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = self.val_windows
        equal_length = self._eval_equal_length()
        num_replicas, rank = self._world()
        # the rank's every num_replicas-th window (padded by repeats, harmless: the best span of
        # each question wins), as Lightning's DistributedSampler would give it
        share = (
            DistributedSampler(windows, num_replicas, rank, shuffle=False)
            if num_replicas > 1
            else SequentialSampler(windows)
        )
        batches = SortedBatchSampler(
            share,
            hp.eval_batch_size,
            lengths=windows["length"][:],
            equal_length=equal_length,
        )
        return DataLoader(
            windows.remove_columns(["length"]),
            batch_sampler=batches,
            collate_fn=self._collator(equal_length),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )


def _map_windows(
    tokenizer: Any,
    train: bool,
    max_length: int,
    stride: int,
    pad_to_max_length: bool,
    batch: dict[str, list],
    indices: list[int],
) -> dict[str, list]:
    if train:
        windows = make_train_windows(
            tokenizer,
            batch["question"],
            batch["context"],
            batch["answers"],
            max_length,
            stride,
            pad_to_max_length,
        )
    else:
        windows = make_eval_windows(
            tokenizer, batch["question"], batch["context"], max_length, stride, pad_to_max_length
        )
    windows["example_index"] = [indices[i] for i in windows["example_index"]]
    return windows
