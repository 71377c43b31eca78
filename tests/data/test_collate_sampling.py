"""Window collation (dynamic padding) and length-grouped sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qa_lightning.data.collate import WindowCollator
from qa_lightning.data.sampling import (
    LengthGroupedSampler,
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
