"""Data parallelism for ``gram_core.training``: sharded (PyTorch FSDP2) or plain, and activation checkpointing.

``shard_model`` applies ``fully_shard`` to each decoder layer and then to a root ``StepModule`` that runs the
step function, so each rank keeps 1/world of the fp32 master weights, gradients and AdamW state. A layer's
weights are all-gathered just before it runs (cast to bf16 under precision bf16) and freed after; gradients
are summed over ranks by reduce-scatter in fp32 during backward. The root holds the rest (embeddings, final
norm, LM head, a reward head), unsharded for the whole step, so step functions may call the model's parts
directly. Parameter names do not change: ``full_state_dict``, ``full_training_state`` and ``load_full_state``
move the same full tensors an unsharded run checkpoints (gathered to rank 0 / broadcast from rank 0; every
rank must take part).

Activation checkpointing: ``set_activation_checkpointing`` (through transformers, any number of ranks).
Plain data parallelism (no sharding): ``all_reduce_gradients`` sums the ranks' gradients in flat buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from gram_core.checkpoints import check_names

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0's CPU, {} elsewhere


class StepModule(torch.nn.Module):
    """The FSDP root: ``forward(batch)`` is ``step_fn(model, batch)``, so the root's hooks (gather the rest of
    the weights, reduce their gradients) wrap step functions that call the decoder or the LM head directly."""

    def __init__(self, model: torch.nn.Module, step_fn: Callable) -> None:
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch: dict):
        return self.step_fn(self.model, batch)


def hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The outermost Hugging Face model inside ``model`` (itself, under a peft or reward-model wrapper)."""
    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no Hugging Face model (sharding and activation "
                        "checkpointing work on decoder layers of transformers models)")
    return found


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    layers = getattr(hf_model(model).get_decoder(), "layers", None)
    if not layers:
        raise TypeError(f"{type(model).__name__}: its decoder has no `layers` list to shard")
    return layers


def shard_model(model: torch.nn.Module, step_fn: Callable, precision: str) -> StepModule:
    """FSDP2 over each decoder layer, then the root StepModule (call it with a batch to run a step).

    Gradients are summed, not averaged, over ranks: the trainer scales each rank's loss by its share of the
    global batch already. Needs torch.distributed initialized; the model sits on its training device.
    """
    if any(hasattr(m, "peft_config") for m in model.modules()):
        raise ValueError("train.sharding 'fsdp' does not support LoRA (model.lora_r > 0): its trainable state is "
                         "small already; use sharding 'none' with LoRA")
    if is_sharded(model):
        raise ValueError("shard_model: the model is sharded already")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    root = StepModule(model, step_fn)
    for module in [*decoder_layers(model), root]:
        fully_shard(module, mesh=mesh, mp_policy=mixed)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return root


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0's CPU ({} on other ranks); None when ``model`` is not sharded.
    Collective: every rank calls it."""
    if not is_sharded(model):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        names: Sequence[str]) -> tuple[dict, dict]:
    """(trainable weights by name, ``optimizer.state_dict()``) as an unsharded run checkpoints them (full
    tensors; the optimizer's keyed by parameter index), on rank 0's CPU; ({}, {}) on other ranks. ``names``:
    the trainable parameters' names in the optimizer's order. Collective."""
    weights = full_state_dict(model, trainable_only=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not by_name:
        return {}, {}
    weights = {name: weights[name] for name in names}  # tied weights appear once, as in named_parameters
    index = {name: i for i, name in enumerate(names)}
    return weights, {"state": {index[name]: value for name, value in by_name["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                      for g in by_name["param_groups"]]}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str],
                    weights_file: Path, optimizer_state: dict) -> None:
    """Load a checkpoint's full trainable weights and ``optimizer.state_dict()`` into the sharded ``model`` and
    ``optimizer``: rank 0 reads them and broadcasts, each rank keeps its shard. Collective."""
    with safe_open(str(weights_file), "pt") as handle:  # every rank checks the names (errors must not hang)
        check_names(weights_file.parent, set(handle.keys()), set(names))
    first = dist.get_rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, load_file(str(weights_file)) if first else {}, options=options)
    by_name = {}
    if first:
        by_name = {"state": {names[i]: value for i, value in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant
    torch.utils.checkpoint, through transformers) when ``enabled``; switch it off otherwise. Checkpointed
    layers run without a KV cache (transformers drops it: a replay would write it twice)."""
    hf = hf_model(model)
    if enabled and hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enabled:  # transformers < 5.24
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(hf, "activation_checkpointing_disable"):
        hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_disable()


GRAD_BUCKET_ELEMENTS = 1 << 24  # all-reduce gradients in ~64 MB fp32 buckets


def all_sum(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(tensor)
    return float(tensor)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in flat buckets (each rank's share is already scaled by its global weight,
    so the sum is the global-batch mean gradient: the data-parallel average)."""
    for p in params:
        if p.grad is None:  # a rank with an empty shard still takes part in the collective
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    for i, p in enumerate(params):
        bucket.append(p.grad)
        if sum(g.numel() for g in bucket) >= GRAD_BUCKET_ELEMENTS or i == len(params) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket = []
