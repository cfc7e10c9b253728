"""Plans: the encoded rows, step function and collator of one stage (``gram_core.stages`` names them), and
``train_judge`` / ``train_pretrain``, which run one through ``gram_core.training.train``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from gram_core import shared_forward
from gram_core.batching import DataOrder, Groups, preference_groups, total_steps
from gram_core.config import EncodeConfig, TrainConfig
from gram_core.encoding import JudgeEncoder, PretrainEncoder, encode_preference_pairs, encode_unlabeled_pairs
from gram_core.steps import (
    Collate,
    StepFn,
    collate_judge,
    collate_pretrain,
    judge_step_fn,
    pretrain_step_fn,
    shared_judge_step_fn,
)
from gram_core.training import TrainResult, dist_info, train

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """What ``train`` needs for one stage: the module to train, its encoded examples, step function, collator."""

    model: torch.nn.Module
    examples: list[dict]
    step_fn: StepFn
    collate: Collate
    lengths: list[int]
    groups: Groups | None = None
    data_stats: dict = dataclasses.field(default_factory=dict)


def run_plan(plan: Plan, config: TrainConfig, **kwargs: Any) -> TrainResult:
    """``train`` on a plan; ``kwargs`` (output_dir, resume_from, on_metrics, on_checkpoint) go to ``train``."""
    result = train(plan.model, plan.examples, plan.step_fn, config, collate=plan.collate, lengths=plan.lengths,
                   groups=plan.groups, **kwargs)
    result.data_stats = plan.data_stats
    return result


def plan_judge(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig) -> Plan:
    """Stage 2 on preference rows dict(pair_id, prompt, chosen, rejected)."""
    encoder = JudgeEncoder(tokenizer, encode_cfg.max_length, encode_cfg.label_a, encode_cfg.label_b,
                           system_prompt=encode_cfg.system_prompt)
    # Every pair in both orders (2i: chosen in A, 2i + 1: in B); `order` decides how an epoch uses them.
    examples, stats = encode_preference_pairs(encoder, rows, order="both")
    groups = preference_groups(len(examples) // 2, encode_cfg.order)
    prefix, reuse = encoder.prefix_ids, train_cfg.prefix_reuse
    if train_cfg.reuse_prefix and not reuse:
        log.warning("train_judge: reuse_prefix is off under sharding %s / activation_checkpointing %s (full "
                    "sequences; see TrainConfig.reuse_prefix)", train_cfg.sharding, train_cfg.activation_checkpointing)
    lengths = [len(ex["suffix_ids"]) + (0 if reuse else len(prefix)) for ex in examples]
    if reuse and train_cfg.shared_segments and shared_forward.supports(model):
        step_fn = shared_judge_step_fn(encoder.label_ids, prefix, train_cfg.label_smoothing,
                                       cache_bytes=frozen_cache_bytes(train_cfg, lengths, groups))
        collate = shared_forward.collate_shared_judge(tokenizer.pad_token_id)
    else:
        step_fn = judge_step_fn(encoder.label_ids, prefix, train_cfg.label_smoothing, reuse_prefix=reuse)
        collate = collate_judge(tokenizer.pad_token_id, None if reuse else prefix)
    return Plan(model, examples, step_fn, collate, lengths, groups, {**stats, "order": encode_cfg.order})


def frozen_cache_bytes(config: TrainConfig, lengths: Sequence[int], groups: Groups | None = None) -> int:
    """The shared-segment forward's budget for frozen-layer outputs: ``frozen_cache_mb``, or 0 when the run
    never sees an example twice (one epoch or less: a cache would only cost memory)."""
    world = dist_info()[1]
    order = DataOrder(lengths, config.batch_size * config.grad_accum_steps * world, 0, groups)
    revisits = total_steps(len(lengths), config, world, groups) > order.steps_per_epoch
    return (config.frozen_cache_mb << 20) if revisits else 0


def plan_pretrain(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig) -> Plan:
    """Stage 1 on response pairs: rows dict(pair_id, prompt, response_a, response_b), or preference rows
    (chosen/rejected, labels ignored, slots assigned by a seeded coin per pair)."""
    encoder = PretrainEncoder(tokenizer, encode_cfg.max_length, system_prompt=encode_cfg.system_prompt)
    examples, stats = encode_unlabeled_pairs(encoder, as_unlabeled(rows, encode_cfg.seed))
    lengths = [len(ex["input_ids"]) for ex in examples]
    return Plan(model, examples, pretrain_step_fn(), collate_pretrain(tokenizer.pad_token_id), lengths,
                data_stats=stats)


def train_judge(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig,
                **kwargs: Any) -> TrainResult:
    """Stage 2 (``plan_judge``) in place; ``kwargs`` go to ``train``."""
    return run_plan(plan_judge(model, tokenizer, rows, train_cfg, encode_cfg), train_cfg, **kwargs)


def train_pretrain(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig,
                   **kwargs: Any) -> TrainResult:
    """Stage 1 (``plan_pretrain``) in place; ``kwargs`` go to ``train``."""
    return run_plan(plan_pretrain(model, tokenizer, rows, train_cfg, encode_cfg), train_cfg, **kwargs)


def as_unlabeled(rows: Iterable[dict], seed: int = 0) -> list[dict]:
    """Unlabeled-pair rows; chosen/rejected rows get a seeded random slot order (no position cue to learn)."""
    rows = list(rows)
    flips = np.random.default_rng(seed).random(len(rows)) < 0.5
    out = []
    for row, flip in zip(rows, flips, strict=True):
        if "response_a" in row or "chosen" not in row:
            out.append(row)
            continue
        a, b = (row["rejected"], row["chosen"]) if flip else (row["chosen"], row["rejected"])
        out.append({"pair_id": row.get("pair_id"), "prompt": row.get("prompt"), "response_a": a, "response_b": b})
    return out
