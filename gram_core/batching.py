"""Batch formation: length-grouped batches (little padding, seeded order), the training data order (which
examples form each step's global batch, pairs kept together or one slot order drawn per epoch), rank shards,
and right padding."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from gram_core.config import TrainConfig


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


@dataclasses.dataclass(frozen=True)
class Groups:
    """Example indices that belong together (a pair in its two slot orders) and how an epoch uses them:
    ``pick="all"`` puts every member in the same batch; ``pick="half"`` uses one member per group, the
    first member for a random half of the groups and the second for the rest, drawn anew each epoch."""

    members: tuple[tuple[int, ...], ...]
    pick: str = "all"

    def __post_init__(self) -> None:
        if self.pick not in ("all", "half"):
            raise ValueError(f"Groups.pick must be 'all' or 'half', got {self.pick!r}")
        if self.pick == "half" and any(len(m) != 2 for m in self.members):
            raise ValueError("Groups.pick='half' needs groups of exactly two members")

    @property
    def size(self) -> int:
        """Examples each group contributes per epoch."""
        return 1 if self.pick == "half" else max((len(m) for m in self.members), default=1)


class DataOrder:
    """Which example indices form global batch ``step`` (0-based): a pure function of seed and step.

    Batches are built over ``groups`` (default: every example alone) with ``global_batch`` examples each
    (whole groups; at least one group per batch); each epoch reshuffles, and redraws a ``pick="half"``
    choice, from (seed, epoch).
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int, groups: Groups | None = None) -> None:
        self.lengths, self.global_batch, self.seed = list(lengths), global_batch, seed
        self.groups = groups or Groups(tuple((i,) for i in range(len(self.lengths))))
        self.groups_per_batch = max(1, global_batch // self.groups.size)
        self.steps_per_epoch = math.ceil(len(self.groups.members) / self.groups_per_batch)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        members = self.groups.members
        if self.groups.pick == "half":
            rng = np.random.default_rng([self.seed, epoch, 1])
            first = set(rng.permutation(len(members))[: len(members) // 2].tolist())
            members = tuple((m[0],) if g in first else (m[1],) for g, m in enumerate(members))
        group_lengths = [max(self.lengths[i] for i in m) for m in members]
        batches = length_grouped_batches(group_lengths, self.groups_per_batch, seed=self.seed + epoch)
        return [[i for g in batch for i in members[g]] for batch in batches]

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # each epoch reshuffles with its own seed
            self._epoch = epoch
            self._batches = self._epoch_batches(epoch)
        return self._batches[index]


def preference_groups(num_pairs: int, order: str) -> Groups:
    """Stage 2's grouping of ``num_pairs`` pairs encoded in both orders (examples 2i: chosen in A, 2i + 1: in
    B): ``order="both"`` keeps both in one batch, ``"random_half"`` uses one of them per pair per epoch."""
    if order not in ("both", "random_half"):
        raise ValueError(f"order must be 'random_half' or 'both', got {order!r}")
    return Groups(tuple((i, i + 1) for i in range(0, 2 * num_pairs, 2)), pick="all" if order == "both" else "half")


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous, disjoint part of a global batch (sizes differ by at most one)."""
    n = len(indices)
    return indices[rank * n // world:(rank + 1) * n // world]


def total_steps(num_examples: int, config: TrainConfig, world: int = 1, groups: Groups | None = None) -> int:
    """Optimizer steps the run takes: max_steps if set, else ceil(epochs * batches per epoch)."""
    if config.max_steps > 0:
        return config.max_steps
    order = DataOrder([0] * num_examples, config.batch_size * config.grad_accum_steps * world, 0, groups)
    return math.ceil(config.epochs * order.steps_per_epoch)
