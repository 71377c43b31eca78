"""Batches of windows of similar length: shuffled for training, sorted for evaluation.

Training batches are whole batches of a global order (a function of seed and epoch) dealt out to
the data-parallel ranks by :class:`DistributedBatchSampler`, so that length grouping survives DDP;
:class:`ResumableDataLoader` resumes that order in the middle of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from qa_lightning.core.errors import ConfigError


def length_grouped_order(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    mega_batch_factor: int = 50,
    longest_first: int = 1,
) -> list[int]:
    """Shuffle, cut into mega-batches of ``batch_size * mega_batch_factor`` windows, sort each
    mega-batch by length (longest first), then shuffle the order of the resulting full batches.

    The ``longest_first`` longest batches come first (one per rank under DDP, longest first), so
    that an out-of-memory error shows at the first step; short batches (the end of each
    mega-batch that is not a multiple of ``batch_size``) come last.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    mega = batch_size * mega_batch_factor
    batches = []
    for begin in range(0, len(order), mega):
        chunk = order[begin : begin + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    # a short batch (the ragged end) must stay last: the loader cuts every batch_size indices
    full = [i for i, b in enumerate(batches) if len(b) == batch_size]
    ragged = [i for i, b in enumerate(batches) if len(b) != batch_size]
    batch_order = [full[i] for i in rng.permutation(len(full))]
    # a stable sort: among batches of equal longest window, the shuffled order decides
    leaders = sorted(batch_order, key=lambda i: lengths[batches[i]].max(), reverse=True)
    leaders = leaders[:longest_first]
    batch_order = leaders + [i for i in batch_order if i not in leaders]
    return [int(i) for b in batch_order + ragged for i in batches[b]]


class EpochSeededSampler(Sampler[int]):
    """An order of ``range(num_windows)`` that is a function of ``seed + epoch`` alone
    (Lightning calls ``set_epoch`` before each epoch), so that a resumed epoch replays it."""

    def __init__(self, num_windows: int, seed: int = 0) -> None:
        self.num_windows = num_windows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_windows


class LengthGroupedSampler(EpochSeededSampler):
    """Indices in :func:`length_grouped_order`, reshuffled each epoch (``set_epoch``)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, longest_first: int = 1
    ) -> None:
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.longest_first = longest_first

    def __iter__(self) -> Iterator[int]:
        yield from length_grouped_order(
            self.lengths,
            self.batch_size,
            self.seed + self.epoch,
            longest_first=self.longest_first,
        )


class SeededRandomSampler(EpochSeededSampler):
    """A random permutation of ``range(num_windows)`` drawn from ``seed + epoch``: unlike
    ``RandomSampler``, a function of the epoch alone."""

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.num_windows)
        yield from order.tolist()


class DistributedBatchSampler(BatchSampler):
    """The order ``sampler`` yields, cut into batches of ``batch_size`` windows and dealt out to
    ``num_replicas`` data-parallel ranks: round ``j`` gives rank ``rank`` the global batch
    ``j * num_replicas + rank``.

    Every rank gets whole batches of the global order (length-grouped when the order is, longest
    first when its first ``num_replicas`` batches are the longest) and as many as the others. The
    windows of a last, incomplete round are split into ``num_replicas`` consecutive batches of
    near-equal size, so that every window is seen once per epoch; only where fewer windows than
    ranks are left do some of them repeat (as in ``DistributedSampler``). With one rank, the
    batches are ``sampler``'s order cut every ``batch_size`` windows, as a ``DataLoader`` cuts it.

    Lightning calls ``set_epoch`` on ``batch_sampler.sampler``; the trainer must not wrap this
    sampler in its own ``DistributedSampler`` (``trainer.use_distributed_sampler=false``).
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if isinstance(sampler, DistributedSampler):
            raise ConfigError(
                "the training batches are sharded over the ranks by the data module "
                "(qa_lightning.data.sampling.DistributedBatchSampler), but Lightning replaced "
                "their sampler by its DistributedSampler, which would shard the windows a second "
                "time and undo the length grouping: set trainer.use_distributed_sampler=false "
                "(as conf/trainer/default.yaml does)."
            )
        if drop_last:
            raise ValueError("training batches keep every window: drop_last must be False")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        super().__init__(sampler, batch_size, drop_last)
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        order = np.fromiter(self.sampler, dtype=np.int64)
        size, ranks = self.batch_size, self.num_replicas
        round_size = size * ranks
        whole = len(order) // round_size * round_size
        for begin in range(0, whole, round_size):
            start = begin + self.rank * size
            yield order[start : start + size].tolist()
        rest = order[whole:]
        if len(rest):
            if len(rest) < ranks:
                rest = np.resize(rest, ranks)  # repeats windows: one for every rank
            yield np.array_split(rest, ranks)[self.rank].tolist()

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / (self.batch_size * self.num_replicas))


def sorted_batches(
    lengths: Sequence[int], batch_size: int, equal_length: bool = False
) -> list[np.ndarray]:
    """Positions in ``lengths`` cut into batches, longest windows first (for evaluation).

    Batches of ``batch_size`` windows sorted by length; with ``equal_length``, batches of at most
    ``batch_size`` windows of one length, which need neither padding nor an attention mask (more,
    smaller batches: faster on CPUs, where cost follows the token count).
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    runs = np.flatnonzero(np.diff(lengths[order])) + 1 if equal_length else []
    return [
        run[first : first + batch_size]
        for run in np.split(order, runs)
        for first in range(0, len(run), batch_size)
    ]


class SortedBatchSampler(BatchSampler):
    """The indices ``sampler`` yields (e.g. a rank's share under DDP), in :func:`sorted_batches`.

    A ``BatchSampler``, so that Lightning can rebuild it around its distributed sampler.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        equal_length: bool = False,
    ) -> None:
        if drop_last:
            raise ValueError("evaluation batches keep every window: drop_last must be False")
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = np.asarray(lengths)
        self.equal_length = equal_length

    def _batches(self) -> list[list[int]]:
        indices = np.fromiter(self.sampler, dtype=np.int64)
        batches = sorted_batches(self.lengths[indices], self.batch_size, self.equal_length)
        return [indices[batch].tolist() for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with the ``state_dict``/``load_state_dict`` interface that Lightning uses
    to resume a loader in the middle of an epoch (as ``torchdata``'s ``StatefulDataLoader``).

    Lightning stores :meth:`state_dict` (the batches yielded so far this epoch) in the
    checkpoint; after :meth:`load_state_dict`, the next epoch starts by skipping that many
    batches. The order itself must be a function of the epoch (the samplers above draw it from
    ``seed + epoch``); under DDP every rank has
    yielded as many batches and skips as many. The workers' base seed is drawn from the loader's
    own ``generator``, so that starting an epoch does not draw from the global RNG (dropout).
    """

    _batches_yielded = 0
    _batches_to_skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._batches_to_skip = int(state_dict["batches_yielded"])

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing runs before the first batch is asked for, i.e. after Lightning
        # has called the sampler's set_epoch for the (resumed) epoch
        skip, self._batches_to_skip = self._batches_to_skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        self._batches_yielded = skip
        for batch in batches:
            self._batches_yielded += 1
            yield batch
