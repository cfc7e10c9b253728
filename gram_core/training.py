"""The one training loop, shared by both GRAM stages and the Bradley-Terry baseline (``gram_core.plans`` sets
each one up).

``train`` runs AdamW over the trainable parameters with a warm-up + cosine schedule, gradient accumulation,
clipping and optional bf16 autocast over fp32 master weights (bf16/fp16 trainable parameters are refused
unless opted into: gram_core.precision), on length-grouped seeded batches. Checkpoints hold everything needed
to continue exactly (trainable weights, optimizer, scheduler, step, RNG states); the data order is a pure
function of (seed, step), so a resumed run sees the same batches as an uninterrupted one.

Distributed (torch.distributed initialized): every global batch is split into disjoint per-rank shards and
gradients are all-reduced by hand before clipping. There is no DDP wrapper because the judge forward calls
the model twice per step (shared prefix, then the suffixes), which DDP's hooks do not support. With
``sharding`` 'fsdp' the model is sharded instead (gram_core.sharding): FSDP reduce-scatters gradients in
backward, every rank runs the same number of micro-batches (padding ones weigh 0), and checkpoints gather the
same full tensors to rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from gram_core.batching import DataOrder, Groups, shard, total_steps
from gram_core.checkpoints import load_checkpoint, save_checkpoint
from gram_core.config import TrainConfig
from gram_core.forward import StepPrefix
from gram_core.param_groups import param_groups
from gram_core.precision import autocast, check_master_weights
from gram_core.sharding import (
    all_reduce_gradients,
    all_sum,
    full_training_state,
    load_full_state,
    set_activation_checkpointing,
    shard_model,
)
from gram_core.steps import Collate, StepFn

log = logging.getLogger(__name__)

TOKENS_PER_S = "train/tokens_per_s"  # the one wall-clock figure in a step's metrics
WALL_CLOCK_METRICS = frozenset({TOKENS_PER_S})  # differ between identical runs: kept out of content hashes


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step and the example ids."""


@dataclasses.dataclass
class TrainResult:
    steps: int
    history: list[dict]
    final_metrics: dict
    checkpoint: str | None
    data_stats: dict = dataclasses.field(default_factory=dict)  # encoding statistics (convenience wrappers)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every optimizer step of one ``train`` call shares (built once, before the first step)."""

    run: Callable[[dict], tuple[torch.Tensor, dict]]  # run(batch) -> (loss, metrics): the step function bound
    examples: list[dict]
    collate: Collate
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any
    named: list[tuple[str, torch.nn.Parameter]]  # the trainable parameters
    device: torch.device
    rank: int
    world: int
    sharded: bool
    prefix: tuple[torch.nn.Module, StepPrefix] | None = None  # run once per step, not per micro-batch

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]


def train(model: torch.nn.Module, examples: list[dict], step_fn: StepFn, config: TrainConfig, *,
          collate: Collate, lengths: Sequence[int], groups: Groups | None = None,
          output_dir: str | Path | None = None,
          resume_from: str | Path | None = None, on_metrics: Callable[[int, dict], Any] | None = None,
          on_checkpoint: Callable[[str | None, dict], Any] | None = None) -> TrainResult:
    """Train ``model`` in place on ``examples`` and return the step count, per-step metrics and last checkpoint.

    ``groups`` (optional) keeps examples together or picks one per group per epoch (see ``Groups``).
    ``collate(examples) -> batch`` builds a micro-batch dict of tensors; an optional ``"weight"`` entry
    (default: the number of examples) sets its share of the step's mean loss, so gradient accumulation
    and sharding give the same gradient as one big batch. ``step_fn(model, batch) -> (loss, metrics)``
    returns the micro-batch's mean loss and mean metrics. ``lengths`` (tokens per example) drive length
    grouping and the tokens/s metric. Checkpoints go to ``output_dir/checkpoint-<step>`` every
    ``config.checkpoint_every_steps`` and at the end; ``on_checkpoint(path, metrics)`` runs after each on
    every rank (path None on ranks that wrote nothing, since e.g. Ray's report is collective).
    """
    if len(lengths) != len(examples):
        raise ValueError(f"train: {len(lengths)} lengths for {len(examples)} examples")
    if not examples:
        raise ValueError("train: no training examples")
    rank, world = dist_info()
    order = DataOrder(lengths, config.batch_size * config.grad_accum_steps * world, config.seed, groups)
    steps = total_steps(len(examples), config, world, groups)
    ctx = _step_context(model, examples, step_fn, collate, config, steps, rank, world)
    saver = _Checkpoints(ctx, model, output_dir, {"num_examples": len(examples), "global_batch": order.global_batch,
                                                  "total_steps": steps})
    step, history, checkpoint = 0, [], None
    if resume_from is not None:
        step, history = saver.restore(resume_from)
        checkpoint = str(resume_from)
    bar = tqdm(total=steps, initial=step, desc="train", disable=ctx.rank > 0 or not sys.stderr.isatty())
    with _training_mode(model, config), contextlib.closing(bar):
        while step < steps:
            step += 1
            indices = order.batch(step - 1)
            torch.manual_seed(_step_seed(config.seed, step, ctx.rank))  # dropout etc. reproducible on resume
            metrics = _optimizer_step(ctx, indices, step)
            metrics.update(step=step, epoch=step / order.steps_per_epoch)
            metrics[TOKENS_PER_S] = sum(int(lengths[i]) for i in indices) / metrics.pop("_seconds")
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if on_metrics is not None and (step % config.log_every_steps == 0 or step == steps):
                on_metrics(step, metrics)
            every = config.checkpoint_every_steps
            if output_dir is not None and ((every and step % every == 0) or step == steps):
                path = saver.save(step, history)
                checkpoint = path or checkpoint
                if on_checkpoint is not None:
                    on_checkpoint(path, metrics)
    return TrainResult(steps=step, history=history, final_metrics=dict(history[-1]) if history else {},
                       checkpoint=checkpoint)


@contextlib.contextmanager
def _training_mode(model: torch.nn.Module, config: TrainConfig) -> Iterator[None]:
    """The model in train mode (with activation checkpointing when configured), restored afterwards."""
    was_training = model.training
    model.train()
    if config.activation_checkpointing:
        set_activation_checkpointing(model, True)
    try:
        yield
    finally:
        model.train(was_training)
        if config.activation_checkpointing:
            set_activation_checkpointing(model, False)


def _step_context(model: torch.nn.Module, examples: list[dict], step_fn: StepFn, collate: Collate,
                  config: TrainConfig, steps: int, rank: int, world: int) -> StepContext:
    """The model bound to its step function (sharded when asked), the trainable parameters, AdamW and the
    warm-up + cosine schedule over ``steps``."""
    sharded = config.sharding == "fsdp" and world > 1  # one rank: nothing to shard across
    run = shard_model(model, step_fn, config.precision) if sharded else functools.partial(step_fn, model)
    # A step function's shared prefix (stage 2) runs once per step, not per micro-batch (not under FSDP).
    prefix = None if sharded else getattr(step_fn, "step_prefix", None)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("train: the model has no trainable parameters (everything frozen?)")
    check_master_weights(named, config.allow_low_precision_params)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(param_groups(model, params, config), lr=config.learning_rate,
                                  betas=(0.9, config.adam_beta2))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)
    return StepContext(run=run, examples=examples, collate=collate, config=config, optimizer=optimizer,
                       scheduler=scheduler, named=named, device=params[0].device, rank=rank, world=world,
                       sharded=sharded, prefix=(model, prefix) if prefix else None)


class _Checkpoints:
    """Saves and restores the full training state of one run (rank 0 writes; sharded, every rank gathers)."""

    def __init__(self, ctx: StepContext, model: torch.nn.Module, output_dir: str | Path | None,
                 layout: dict[str, int]) -> None:
        self.ctx, self.model, self.output_dir, self.layout = ctx, model, output_dir, layout
        names = {id(p): name for name, p in ctx.named}
        self.optimizer_names = [names[id(p)] for g in ctx.optimizer.param_groups for p in g["params"]]

    def restore(self, folder: str | Path) -> tuple[int, list[dict]]:
        ctx = self.ctx
        restore = functools.partial(load_full_state, self.model, ctx.optimizer, self.optimizer_names) \
            if ctx.sharded else None
        return load_checkpoint(folder, ctx.named, ctx.optimizer, ctx.scheduler, self.layout, restore=restore)

    def save(self, step: int, history: list[dict]) -> str | None:
        ctx = self.ctx
        # Sharded, every rank takes part in gathering the full tensors to rank 0.
        weights, optimizer_state = full_training_state(self.model, ctx.optimizer, self.optimizer_names) \
            if ctx.sharded else (None, None)
        if ctx.rank != 0:
            return None
        return save_checkpoint(Path(self.output_dir) / f"checkpoint-{step}", self.model, ctx.named, ctx.optimizer,
                               ctx.scheduler, {**self.layout, "step": step, "history": history},
                               weights=weights, optimizer_state=optimizer_state)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _optimizer_step(ctx: StepContext, indices: list[int], step: int) -> dict:
    """Forward/backward every micro-batch of this rank's shard, reduce, clip, step. Returns the metrics.

    ``ctx.prefix`` (model, StepPrefix): run the shared prefix once before the micro-batches, backward it after.
    """
    start = time.perf_counter()
    micro, batches, weights = _micro_batches(ctx, indices)
    total_weight = all_sum(sum(weights), ctx.world, ctx.device)
    sums, bad = _forward_backward(ctx, micro, batches, weights, total_weight)
    if ctx.world > 1:
        gathered: list[Any] = [None] * ctx.world
        dist.all_gather_object(gathered, (sums, bad))
        keys = sorted({k for s, _ in gathered for k in s})  # a rank with an empty shard has no keys
        sums = {k: sum(s.get(k, 0.0) for s, _ in gathered) for k in keys}
        bad = [i for _, b in gathered for i in b]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at step {step}: {'; '.join(bad)}")
    params = ctx.params
    if ctx.world > 1 and not ctx.sharded:
        all_reduce_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, ctx.config.max_grad_norm or math.inf)  # global norm, sharded too
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if not bool(torch.isfinite(norm)):
        ids = [_example_id(ctx.examples[i], i) for i in indices]
        raise NonFiniteLossError(f"non-finite gradient norm at step {step} (batch example ids {ids})")
    lr = ctx.scheduler.get_last_lr()[0]
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    out = {f"train/{k}": v / total_weight for k, v in sums.items()}
    out.update({"train/lr": lr, "train/grad_norm": float(norm), "_seconds": max(time.perf_counter() - start, 1e-9)})
    return out


def _micro_batches(ctx: StepContext, indices: list[int]) -> tuple[list[list[int]], list[dict], list[float]]:
    """This rank's micro-batches (example indices, collated batch, weight). Sharded, every rank runs as many
    micro-batches as the largest shard needs (FSDP's collectives run in forward and backward): padding ones
    repeat an example with weight 0."""
    size = ctx.config.batch_size
    mine = shard(indices, ctx.rank, ctx.world)
    micro = [mine[i:i + size] for i in range(0, len(mine), size)]
    batches = [ctx.collate([ctx.examples[i] for i in m]) for m in micro]
    weights = [float(b.pop("weight", len(m))) for b, m in zip(batches, micro, strict=True)]
    if ctx.sharded:
        most = math.ceil(math.ceil(len(indices) / ctx.world) / size)
        for _ in range(most - len(micro)):
            padding = ctx.collate([ctx.examples[indices[0]]])
            padding.pop("weight", None)
            micro, batches, weights = micro + [[]], batches + [padding], weights + [0.0]
    return micro, batches, weights


def _forward_backward(ctx: StepContext, micro: list[list[int]], batches: list[dict], weights: list[float],
                      total_weight: float) -> tuple[dict[str, float], list[str]]:
    """Backward of each micro-batch's weighted loss; returns the weighted metric sums and non-finite losses."""
    sums: dict[str, float] = {}
    bad: list[str] = []
    precision = ctx.config.precision
    if ctx.prefix is not None and micro:
        with autocast(ctx.device, precision):
            ctx.prefix[1].begin(ctx.prefix[0])
    for ids, batch, weight in zip(micro, batches, weights, strict=True):
        batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(ctx.device, precision):
            loss, metrics = ctx.run(batch)
        finite = bool(torch.isfinite(loss.detach()))
        if not finite and ids:
            bad.append(f"loss {float(loss.detach())} on example ids {[_example_id(ctx.examples[i], i) for i in ids]}")
        if finite or ctx.sharded:  # sharded, a skipped backward would leave the other ranks waiting
            # Each micro-batch's mean loss, scaled by its share of the global batch: the sum is the global mean.
            (loss * (weight / total_weight)).backward()
        if finite and ids:
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(torch.as_tensor(value).detach()) * weight
    if ctx.prefix is not None and ctx.prefix[1].active:
        ctx.prefix[1].finish()
    return sums, bad


def _example_id(example: dict, index: int) -> str:
    for key in ("pair_id", "id"):
        if key in example:
            return str(example[key])
    return f"#{index}"
