"""Window collation (dynamic padding) and length-grouped sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from qa_lightning.core.errors import ConfigError
from qa_lightning.data.collate import WindowCollator
from qa_lightning.data.sampling import (
    DistributedBatchSampler,
    LengthGroupedSampler,
    SeededRandomSampler,
    SortedBatchSampler,
    length_grouped_order,
    sorted_batches,
)
from qa_lightning.data.windowing import NO_OFFSET

PAD = 7


def window(length, example_index, start=0, end=0):
    return {
        "input_ids": list(range(100, 100 + length)),
        "token_type_ids": [1] * length,
        "attention_mask": [1] * length,
        "offset_mapping": [[i, i + 1] for i in range(length)],
        "example_index": example_index,
        "start_positions": start,
        "end_positions": end,
    }


@pytest.mark.parametrize(("lengths", "padded"), [((5, 11), 16), ((8, 3), 8), ((1,), 8)])
def test_collator_pads_to_multiple_of_8(lengths, padded):
    windows = [window(n, i, start=i + 1, end=i + 2) for i, n in enumerate(lengths)]
    batch = WindowCollator(pad_token_id=PAD)(windows)
    assert batch["input_ids"].shape == (len(lengths), padded)
    assert batch["offset_mapping"].shape == (len(lengths), padded, 2)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i].tolist() == list(range(100, 100 + n)) + [PAD] * (padded - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (padded - n)
        assert batch["token_type_ids"][i].tolist() == [1] * n + [0] * (padded - n)
        expected_offsets = [[t, t + 1] for t in range(n)] + [[NO_OFFSET, NO_OFFSET]] * (padded - n)
        assert batch["offset_mapping"][i].tolist() == expected_offsets
    assert batch["example_index"].tolist() == list(range(len(lengths)))
    assert batch["start_positions"].tolist() == [i + 1 for i in range(len(lengths))]
    assert batch["end_positions"].tolist() == [i + 2 for i in range(len(lengths))]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_without_multiple_pads_to_longest():
    batch = WindowCollator(pad_token_id=PAD, pad_to_multiple_of=None)([window(5, 0), window(11, 1)])
    assert batch["input_ids"].shape == (2, 11)
    assert batch["input_ids"][0, 5:].tolist() == [PAD] * 6


# -- sampling -----------------------------------------------------------------------------------

LENGTHS = np.random.default_rng(0).integers(10, 384, size=96).tolist()


def batches(order, batch_size):
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("batch_size", "mega_batch_factor"), [(4, 3), (8, 2), (8, 50)])
def test_length_grouped_order(seed, batch_size, mega_batch_factor):
    order = length_grouped_order(LENGTHS, batch_size, seed, mega_batch_factor)
    assert sorted(order) == list(range(len(LENGTHS)))
    for batch in batches(order, batch_size):
        lengths = [LENGTHS[i] for i in batch]
        assert lengths == sorted(lengths, reverse=True)
    assert LENGTHS[order[0]] == max(LENGTHS)


def test_batches_group_similar_lengths():
    # one mega-batch: the batches are the sorted lengths cut into consecutive runs
    order = length_grouped_order(LENGTHS, 8, seed=0, mega_batch_factor=12)
    expected = {tuple(b) for b in batches(sorted(LENGTHS, reverse=True), 8)}
    assert {tuple(LENGTHS[i] for i in b) for b in batches(order, 8)} == expected


def test_seeds():
    assert length_grouped_order(LENGTHS, 4, 3) == length_grouped_order(LENGTHS, 4, 3)
    assert length_grouped_order(LENGTHS, 4, 3) != length_grouped_order(LENGTHS, 4, 4)


def test_sampler_set_epoch_reshuffles():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=4, seed=5)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(second) == list(range(len(LENGTHS))) and len(sampler) == len(LENGTHS)
    assert second == length_grouped_order(LENGTHS, 4, 6)


def test_ragged_last_batch_keeps_batch_boundaries():
    lengths = LENGTHS[:94]  # 23 batches of 4 and one of 2
    for seed in range(5):
        order = length_grouped_order(lengths, 4, seed, mega_batch_factor=3)
        for batch in batches(order, 4):
            batch_lengths = [lengths[i] for i in batch]
            assert batch_lengths == sorted(batch_lengths, reverse=True)


# -- evaluation batches -------------------------------------------------------------------------


def as_lists(batches):
    return [np.asarray(b).tolist() for b in batches]


def test_sorted_batches_by_hand():
    lengths = [5, 3, 5, 5, 2, 3]  # longest first, ties in input order: 0 2 3 | 1 5 | 4
    assert as_lists(sorted_batches(lengths, 2)) == [[0, 2], [3, 1], [5, 4]]
    assert as_lists(sorted_batches(lengths, 2, equal_length=True)) == [[0, 2], [3], [1, 5], [4]]
    assert as_lists(sorted_batches([], 4, equal_length=True)) == []


@pytest.mark.parametrize("batch_size", [1, 3, 8, 200])
def test_equal_length_batches_cover_every_window_once_unpadded(batch_size):
    batches = as_lists(sorted_batches(LENGTHS, batch_size, equal_length=True))
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(1 <= len(b) <= batch_size and len({LENGTHS[i] for i in b}) == 1 for b in batches)
    firsts = [LENGTHS[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    # as few batches as possible: one per length, more only where a length fills batch_size
    counts = np.unique(LENGTHS, return_counts=True)[1]
    assert len(batches) == sum(-(-c // batch_size) for c in counts)


def test_sorted_batch_sampler_batches_its_samplers_share_only():
    share = [1, 3, 5, 7, 9, 11]  # e.g. one rank's indices under DDP
    lengths = [9, 4, 9, 7, 9, 4, 9, 4, 9, 7, 9, 7]
    sampler = SortedBatchSampler(share, 2, lengths=lengths, equal_length=True)
    assert list(sampler) == [[3, 9], [11], [1, 5], [7]]
    assert len(sampler) == 4
    assert list(SortedBatchSampler(share, 4, lengths=lengths)) == [[3, 9, 11, 1], [5, 7]]
    with pytest.raises(ValueError, match="drop_last"):
        SortedBatchSampler(share, 2, drop_last=True, lengths=lengths)


# -- training batches under DDP -----------------------------------------------------------------


def rank_batches(order, batch_size, num_replicas):
    return [
        list(DistributedBatchSampler(order, batch_size, num_replicas=num_replicas, rank=rank))
        for rank in range(num_replicas)
    ]


def test_distributed_batch_sampler_by_hand():
    order = [5, 0, 9, 3, 7, 1, 8, 2, 6, 4, 10]  # 11 windows in batches of 2 for 2 ranks
    # rounds of 4 windows: global batches 0 and 2 to rank 0, 1 and 3 to rank 1; the last 3
    # windows split 2 / 1, so that each is seen once
    assert rank_batches(order, 2, 2) == [[[5, 0], [7, 1], [6, 4]], [[9, 3], [8, 2], [10]]]
    assert rank_batches([4, 2, 0, 1, 3], 2, 3) == [[[4, 2]], [[0, 1]], [[3]]]
    # fewer windows left than ranks: one repeated for each rank
    assert rank_batches([6, 5, 4, 3, 2, 1, 0], 2, 3) == [
        [[6, 5], [0]],
        [[4, 3], [0]],
        [[2, 1], [0]],
    ]
    assert [len(DistributedBatchSampler(order, 2, num_replicas=n)) for n in (1, 2, 3)] == [6, 3, 2]


def test_one_rank_cuts_the_order_as_a_data_loader_does():
    sampler = LengthGroupedSampler(LENGTHS[:94], batch_size=8, seed=3)  # 11 batches of 8 and 6
    (mine,) = rank_batches(sampler, 8, 1)
    assert mine == batches(length_grouped_order(LENGTHS[:94], 8, 3), 8)
    assert len(DistributedBatchSampler(sampler, 8)) == 12


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("epoch", [0, 1])
def test_ranks_get_whole_length_grouped_batches_longest_first(num_replicas, epoch):
    lengths = LENGTHS[:94]
    sampler = LengthGroupedSampler(lengths, 4, seed=7, longest_first=num_replicas)
    sampler.set_epoch(epoch)
    ranks = rank_batches(sampler, 4, num_replicas)
    assert len({len(mine) for mine in ranks}) == 1  # as many batches on every rank
    assert sorted(i for mine in ranks for b in mine for i in b) == list(range(94))  # once each
    # the global order, batch by batch, round by round
    order = length_grouped_order(lengths, 4, 7 + epoch, longest_first=num_replicas)
    dealt = [i for round_ in zip(*ranks, strict=True) for b in round_ for i in b]
    assert dealt == order
    for mine in ranks:
        longest = [max(lengths[i] for i in b) for b in mine]
        assert longest[0] == max(longest)  # each rank's longest batch first
        for b in mine[:-1]:  # whole batches of the sorted mega-batches
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # the longest_first longest batches of the epoch lead, one per rank
    firsts = [max(lengths[i] for i in mine[0]) for mine in ranks]
    every = sorted((max(lengths[i] for i in b) for mine in ranks for b in mine), reverse=True)
    assert firsts == every[:num_replicas]


def test_random_batches_are_a_function_of_seed_and_epoch():
    sampler = SeededRandomSampler(94, seed=5)
    first = rank_batches(sampler, 4, 2)
    assert rank_batches(sampler, 4, 2) == first  # replayed, e.g. by a resumed run
    assert sorted(i for mine in first for b in mine for i in b) == list(range(94))
    sampler.set_epoch(1)
    assert rank_batches(sampler, 4, 2) != first
    assert list(sampler) == np.random.default_rng(6).permutation(94).tolist()


def test_longest_first_puts_the_longest_batches_first():
    order = length_grouped_order(LENGTHS, 4, seed=1, mega_batch_factor=3, longest_first=3)
    longest = [max(LENGTHS[i] for i in b) for b in batches(order, 4)]
    assert longest[:3] == sorted(longest, reverse=True)[:3]
    # with one, the order is unchanged: only the longest batch moves to the front
    assert length_grouped_order(LENGTHS, 4, 1, 3, longest_first=1) == length_grouped_order(
        LENGTHS, 4, 1, 3
    )


def test_lightnings_distributed_sampler_is_refused():
    lightning_sampler = DistributedSampler(range(10), num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match="trainer.use_distributed_sampler=false"):
        DistributedBatchSampler(lightning_sampler, 2, num_replicas=2, rank=0)
