"""Batch formation: length-grouped batches (little padding, seeded order) and right padding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                           mega_batches: int = 50) -> list[list[int]]:
    """Index batches that group similar lengths together.

    Indices are (shuffled by ``seed``, then) cut into mega-chunks of ``mega_batches * batch_size``; each
    chunk is sorted by length, longest first, and cut into batches. With ``shuffle`` the batch order is
    then shuffled by ``seed``, with the batch holding the longest sequence moved first (memory peaks show
    at step 1, not hours in). Without ``shuffle`` the result is deterministic in the input order
    (judging). Every index appears exactly once; only the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"length_grouped_batches: batch_size must be >= 1, got {batch_size}")
    if mega_batches < 1:
        raise ValueError(f"length_grouped_batches: mega_batches must be >= 1, got {mega_batches}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"length_grouped_batches: lengths must be a flat sequence, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"length_grouped_batches: negative length at index {int(lengths.argmin())}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    chunk = mega_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        members = order[start:start + chunk]
        # Stable sort on -length: ties keep their (shuffled) order, so the result depends only on the seed.
        members = members[np.argsort(-lengths[members], kind="stable")]
        batches += [members[i:i + batch_size].tolist() for i in range(0, len(members), batch_size)]
    if shuffle and batches:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda b: int(lengths[batches[b]].max()))
        batches.insert(0, batches.pop(longest))
    return batches


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to one LongTensor [B, T_max]; the attention mask is 1 on real tokens."""
    if len(seqs) == 0:
        raise ValueError("pad_right: no sequences to pad")
    for row, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"pad_right: sequence {row} is empty (every row needs at least one token)")
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask
