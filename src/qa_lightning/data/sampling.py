"""Batches of windows of similar length: shuffled for training, sorted for evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, mega_batch_factor: int = 50
) -> list[int]:
    """Shuffle, cut into mega-batches of ``batch_size * mega_batch_factor`` windows, sort each
    mega-batch by length (longest first), then shuffle the order of the resulting full batches.

    The longest batch comes first, so that an out-of-memory error shows at the first step; short
    batches (the end of each mega-batch that is not a multiple of ``batch_size``) come last.
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
    if batch_order:
        longest = max(batch_order, key=lambda i: lengths[batches[i]].max())
        batch_order.remove(longest)
        batch_order.insert(0, longest)
    return [int(i) for b in batch_order + ragged for i in batches[b]]


class LengthGroupedSampler(Sampler[int]):
    """Indices in :func:`length_grouped_order`, reshuffled each epoch (``set_epoch``)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        yield from length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch)


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
