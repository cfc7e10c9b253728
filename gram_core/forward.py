"""Answer-position logits of the two verdict tokens (shared by training and judging).

z = h_last · W[label_ids]ᵀ: the decoder's final hidden state at each row's last real token times the LM-head
rows of "A" and "B" only, never the [B, T, V] full-vocabulary logits. The judge instruction is the same for
every pair, so its key/value cache can be computed once (batch 1) and expanded over the batch; the suffix
then runs with positions continuing after the prefix and the attention mask ones(prefix) + suffix mask.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """Per-layer (key, value) tensors [1, heads, P, head_dim] of a shared prefix; read-only once built."""

    prefix_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def length(self) -> int:
        return len(self.prefix_ids)


def model_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(decoder, lm_head, config) of an HF causal LM, peft-wrapped or not.

    peft injects LoRA layers in place, so the base model's own decoder runs with the adapters active.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or decoder is base or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a separate decoder and LM head "
                        "(expected e.g. LlamaForCausalLM, optionally peft-wrapped)")
    return decoder, head, base.config


def cache_kwarg(decoder: torch.nn.Module) -> str:
    """The decoder's KV-cache argument: transformers 5.24 renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def expanded_prefix_kwargs(decoder: torch.nn.Module, layers, batch: int) -> dict:
    """Forward kwargs with a fresh DynamicCache holding the batch-1 prefix ``layers`` expanded to ``batch``.

    expand() is a view; the cache's first update concatenates into new tensors, so ``layers`` stay intact.
    """
    expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers]
    return {cache_kwarg(decoder): DynamicCache(expanded, config=decoder.config), "use_cache": True}


def _prefix_layers(decoder: torch.nn.Module, prefix_ids: Sequence[int], device) -> tuple:
    """Run the prefix (batch 1) and return its per-layer (key, value) tensors; grad follows the caller."""
    if len(prefix_ids) == 0:
        raise ValueError("prefix_ids is empty; pass prefix=None to run full sequences instead")
    ids = torch.as_tensor([list(prefix_ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=decoder.config)  # filled in place by the forward
    decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_kwarg(decoder): cache})
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def build_prefix_cache(model, prefix_ids: Sequence[int]) -> PrefixCache:
    """One forward of the shared prefix (batch 1, no grad) for reuse across judging batches.

    Rebuild it after the weights change (it holds the KV of the weights at build time).
    """
    decoder, _, _ = model_parts(model)
    device = decoder.get_input_embeddings().weight.device
    with torch.no_grad():
        layers = _prefix_layers(decoder, prefix_ids, device)
    return PrefixCache(prefix_ids=tuple(int(i) for i in prefix_ids), layers=layers)


class StepPrefix:
    """The shared prefix run once per optimizer step (with grad) for every micro-batch of the step.

    ``begin(model)`` runs the prefix and keeps detached copies of its keys/values; each micro-batch uses
    ``cache()`` and its backward stops there, summing into the copies' ``.grad``; ``finish()`` sends that sum
    through the prefix once. The gradient is the one of running the prefix in every micro-batch (backward
    is linear), at the cost of one prefix forward and backward per step instead of one per micro-batch.
    """

    def __init__(self, prefix_ids: Sequence[int]):
        self.prefix_ids = tuple(int(i) for i in prefix_ids)
        self._layers: tuple | None = None
        self._leaves: tuple | None = None

    @property
    def active(self) -> bool:
        return self._leaves is not None

    def begin(self, model) -> None:
        decoder, _, _ = model_parts(model)
        self._layers = _prefix_layers(decoder, self.prefix_ids, decoder.get_input_embeddings().weight.device)
        self._leaves = tuple(tuple(t.detach().requires_grad_(t.requires_grad) for t in kv) for kv in self._layers)

    def cache(self) -> PrefixCache:
        if self._leaves is None:
            raise RuntimeError("StepPrefix.cache() outside begin()/finish()")
        return PrefixCache(prefix_ids=self.prefix_ids, layers=self._leaves)

    def finish(self) -> None:
        """Backward through the prefix with the gradient the step's micro-batches left at its keys/values."""
        outputs, grads = [], []
        for kv, leaves in zip(self._layers or (), self._leaves or (), strict=True):
            for tensor, leaf in zip(kv, leaves, strict=True):
                if leaf.grad is not None:
                    outputs.append(tensor)
                    grads.append(leaf.grad)
        self._layers = self._leaves = None
        if outputs:
            torch.autograd.backward(outputs, grads)


def _check_right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real-token counts per row; raises unless every row is ones then zeros with at least one token."""
    lengths = attention_mask.long().sum(dim=1)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    bad = (attention_mask.bool() != expected).any(dim=1) | (lengths == 0)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()[:5]
        raise ValueError(f"attention_mask rows {rows} are not right-padded (ones, then zeros, at least one "
                         "token); pad with batching.pad_right")
    return lengths


def answer_hidden(model, suffix_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prefix: PrefixCache | Sequence[int] | None = None) -> torch.Tensor:
    """Final hidden state [B, H] at each row's last real token (after the optional shared prefix).

    ``prefix``: None (suffix_ids are full sequences), a list of ids (run once inside this call, with grad
    when grad is enabled), or a PrefixCache (reused; never mutated: each call expands it into a new cache).
    """
    decoder, _, _ = model_parts(model)
    if suffix_ids.shape != attention_mask.shape or suffix_ids.dim() != 2:
        raise ValueError(f"suffix_ids {tuple(suffix_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, T]")
    lengths = _check_right_padded(attention_mask)
    batch, width = suffix_ids.shape
    offset, kwargs = 0, {"use_cache": False}
    if prefix is not None:
        layers = prefix.layers if isinstance(prefix, PrefixCache) else _prefix_layers(decoder, prefix, suffix_ids.device)
        offset = layers[0][0].shape[-2]
        kwargs = expanded_prefix_kwargs(decoder, layers, batch)
        ones = torch.ones(batch, offset, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    # Right padding: real tokens sit at positions offset .. offset + length - 1 in every row.
    positions = (torch.arange(width, device=suffix_ids.device) + offset).unsqueeze(0).expand(batch, -1)
    hidden = decoder(input_ids=suffix_ids, attention_mask=attention_mask, position_ids=positions,
                     **kwargs).last_hidden_state
    return hidden[torch.arange(batch, device=hidden.device), lengths.to(hidden.device) - 1]


def label_logits(model, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """z = h · W[label_ids]ᵀ (+ bias, softcapping as the model's own head does) -> [B, len(label_ids)]."""
    _, head, config = model_parts(model)
    ids = torch.as_tensor(list(label_ids), dtype=torch.long, device=head.weight.device)
    logits = hidden @ head.weight[ids].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        # Gemma-2 style heads: logits = c * tanh(logits / c).
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def answer_logits(model, suffix_ids: torch.Tensor, attention_mask: torch.Tensor, label_ids: Sequence[int],
                  prefix: PrefixCache | Sequence[int] | None = None) -> torch.Tensor:
    """Verdict logits [B, 2] = (z_A, z_B) at each row's last real token, right-padded suffix batch.

    See ``answer_hidden`` for ``prefix``; without a prefix, ``suffix_ids`` must be the full ids.
    """
    if len(label_ids) != 2:
        raise ValueError(f"label_ids must be the two verdict token ids (A, B), got {list(label_ids)}")
    return label_logits(model, answer_hidden(model, suffix_ids, attention_mask, prefix), label_ids)
