"""Length-grouped batches and right padding."""

import pytest
import torch

from gram_core.batching import length_grouped_batches, pad_right


def test_batches_cover_every_index_once_and_are_seeded():
    lengths = [(i * 37) % 101 for i in range(230)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, mega_batches=5)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(230))
    assert [len(b) for b in batches].count(8) == 28  # 230 = 28 * 8 + 6
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, mega_batches=5)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4, mega_batches=5)


def test_batches_group_similar_lengths():
    lengths = [(i * 7919) % 1000 for i in range(400)]
    batches = length_grouped_batches(lengths, batch_size=10, seed=0, mega_batches=40)  # one mega-chunk
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    # 400 distinct-ish lengths over 0..999 sorted into 40 batches: each spans ~25, not ~1000
    assert max(spreads) < 60
    assert batches[0] == sorted(batches[0], key=lambda i: -lengths[i])
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first


def test_without_shuffle_keeps_chunk_order_and_sorts_within_chunks():
    lengths = [1, 5, 3, 9, 2, 8, 7, 4]
    batches = length_grouped_batches(lengths, batch_size=2, seed=0, shuffle=False, mega_batches=2)
    # chunk 1 = indices 0..3 (lengths 1,5,3,9), chunk 2 = indices 4..7 (lengths 2,8,7,4)
    assert batches == [[3, 1], [2, 0], [5, 6], [7, 4]]


def test_batching_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], batch_size=0, seed=0)
    with pytest.raises(ValueError, match="index 1"):
        length_grouped_batches([1, -2], batch_size=1, seed=0)
    assert length_grouped_batches([], batch_size=4, seed=0) == []


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    labels, _ = pad_right([[1, -100], [2]], pad_id=-100)
    assert labels.tolist() == [[1, -100], [2, -100]]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_right([[1], []], pad_id=0)
