"""Stage 2's verdict logits over shared segments: the same numbers as a full-sequence forward, less work.

A micro-batch of judge sequences (preamble + suffix) is cut into segments that each run once:
  preamble   the template head + judge instruction, the same in every sequence
  shared     per group (a pair's two slot orders): the longest common prefix of the members' suffixes
             (the question and the A header), run once for both orders
  remainder  per sequence: the rest, ending at the verdict position
Every segment attends to the keys/values of the segments before it, at the positions it has in the full
sequence, so each hidden state is the full forward's (up to float rounding). On top of that:
  - layers below the first trainable one are frozen: they run without grad, over the preamble once per run
    and over a group's segments once per run while the cache has room (exact: dropout is 0);
  - the trainable layers run the preamble once per optimizer step; its keys/values are detached leaves that
    collect the gradient of every micro-batch, sent back through the preamble once (``finish``);
  - the last layer computes only keys/values at every position, and its queries, attention output, output
    projection and MLP at the verdict position alone (nothing else reads them).
Supported: Llama-style decoders (q/k/v/o projections, RMSNorm, rotary positions, grouped-query attention, no
sliding window, no dropout); ``supports(model)`` says, and callers fall back to ``forward.answer_logits``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from gram_core.batching import pad_right
from gram_core.forward import label_logits, model_parts

SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def supports(model) -> bool:
    """Whether ``model`` is a decoder this module computes exactly (else use forward.answer_logits)."""
    try:
        decoder, _, config = model_parts(model)
    except TypeError:
        return False
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        return False
    if any(type(layer).__name__ not in SUPPORTED_LAYERS for layer in layers):
        return False
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return not windowed and not getattr(config, "attention_dropout", 0.0) and \
        getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def first_trainable_layer(model) -> int:
    """Index of the lowest decoder layer with a trainable parameter (0 if the embeddings train; the layer count
    if none does): every layer below it is a fixed function of the tokens."""
    decoder, _, _ = model_parts(model)
    if decoder.embed_tokens.weight.requires_grad:
        return 0
    for index, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(decoder.layers)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs``, at most the shortest minus one (each keeps a token)."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs[1:]):
        n += 1
    return n


def collate_shared_judge(pad_id: int):
    """Micro-batch of stage-2 examples (pair_id, suffix_ids, label) as groups: consecutive examples with the
    same pair_id share their common prefix. Returns shared/remainder ids, lengths, group of each example,
    labels and the cache keys (the token tuples) of the shared segments and the suffixes."""

    def collate(examples: list[dict]) -> dict:
        groups: list[list[int]] = []
        for i, ex in enumerate(examples):
            if groups and ex.get("pair_id") is not None and examples[groups[-1][0]].get("pair_id") == ex["pair_id"]:
                groups[-1].append(i)
            else:
                groups.append([i])
        shared, rest, member = [], [None] * len(examples), [0] * len(examples)
        for g, members in enumerate(groups):
            suffixes = [list(examples[i]["suffix_ids"]) for i in members]
            n = common_prefix(suffixes)
            shared.append(suffixes[0][:n])
            for i, suffix in zip(members, suffixes, strict=True):
                rest[i], member[i] = suffix[n:], g
        shared_ids, shared_mask = _pad_allow_empty(shared, pad_id)
        rest_ids, rest_mask = pad_right(rest, pad_id)
        return {"shared_ids": shared_ids, "shared_len": shared_mask.sum(1), "rest_ids": rest_ids,
                "rest_len": rest_mask.sum(1), "group": torch.tensor(member, dtype=torch.long),
                "labels": torch.tensor([int(ex.get("label", -1)) for ex in examples], dtype=torch.long),
                "shared_keys": [tuple(s) for s in shared],
                "suffix_keys": [tuple(ex["suffix_ids"]) for ex in examples]}

    return collate


def _pad_allow_empty(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


@dataclasses.dataclass
class _Keys:
    """Rotated keys and values [B, kv_heads, T, head_dim] of one segment kind at one layer, with the real-token
    mask [B, T] (True = attend)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


class SharedJudgeForward:
    """Verdict logits of a collated micro-batch (``collate_shared_judge``) for one model and preamble.

    ``begin(model)`` / ``finish()`` bracket an optimizer step (the trainable layers' preamble runs once per
    step); ``logits(model, batch)`` outside them runs the preamble itself. ``cache_bytes`` bounds the frozen
    layers' outputs kept per group (0: none).
    """

    def __init__(self, preamble_ids: Sequence[int], label_ids: Sequence[int] = (), cache_bytes: int = 0,
                 lm_of=None):
        if not preamble_ids:
            raise ValueError("SharedJudgeForward needs a non-empty preamble (the judge instruction)")
        self.preamble_ids, self.label_ids = [int(i) for i in preamble_ids], [int(i) for i in label_ids]
        self.cache_bytes = int(cache_bytes)
        self.lm_of = lm_of or (lambda model: model)  # the causal LM inside what the trainer holds (BT: .base)
        self._model_id: int | None = None
        self._frozen_preamble: tuple | None = None  # (hidden at the first trainable layer, frozen layers' keys)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0
        self._step: tuple | None = None  # (graph keys/values, leaves) of the trainable layers' preamble
        self.cache_hits = self.cache_misses = 0

    # ---- per-run and per-step state ------------------------------------------------------------------
    def _bind(self, model) -> None:
        model = self.lm_of(model)
        if self._model_id != id(model):
            self._model_id, self._frozen_preamble, self._cache, self._cached_bytes = id(model), None, {}, 0
            self.boundary = first_trainable_layer(model)

    @property
    def active(self) -> bool:
        return self._step is not None

    def begin(self, model) -> None:
        self._bind(model)
        model = self.lm_of(model)
        graph = self._preamble_trainable(model)
        leaves = [(k.detach().requires_grad_(k.requires_grad), v.detach().requires_grad_(v.requires_grad))
                  for k, v in graph]
        self._step = (graph, leaves)

    def finish(self) -> None:
        graph, leaves = self._step or ((), ())
        self._step = None
        outputs, grads = [], []
        for kv, leaf_kv in zip(graph, leaves, strict=True):
            for tensor, leaf in zip(kv, leaf_kv, strict=True):
                if leaf.grad is not None:
                    outputs.append(tensor)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)

    # ---- the forward ---------------------------------------------------------------------------------
    def logits(self, model, batch: dict) -> torch.Tensor:
        """(z_A, z_B) [B, 2] at each sequence's verdict position."""
        return label_logits(self.lm_of(model), self.hidden(model, batch), self.label_ids)

    def hidden(self, model, batch: dict) -> torch.Tensor:
        """The final (normed) hidden state [B, H] at each sequence's last token."""
        self._bind(model)
        model = self.lm_of(model)
        decoder, _, _ = model_parts(model)
        layers, boundary = decoder.layers, self.boundary
        frozen_keys, _ = self._frozen_preamble_state(model)
        trainable_keys = self._step[1] if self._step is not None else self._preamble_trainable(model)
        all_keys = list(frozen_keys) + list(trainable_keys)
        shared, rest = self._frozen_outputs(model, batch, frozen_keys)
        geometry = _Geometry(batch, len(self.preamble_ids), shared.device, decoder)
        last = len(layers) - 1
        for index in range(min(boundary, last), last):
            shared, rest = _layer(decoder, layers[index], all_keys[index], shared, rest, geometry)
        return decoder.norm(_last_layer(decoder, layers[last], all_keys[last], shared, rest, geometry))

    def _frozen_preamble_state(self, model) -> tuple:
        """Frozen layers' preamble keys/values and the preamble's hidden state entering the first trainable
        layer: computed once per run (they depend on frozen weights and fixed tokens only)."""
        if self._frozen_preamble is None:
            decoder, _, _ = model_parts(model)
            stop = min(self.boundary, len(decoder.layers) - 1)
            with torch.no_grad():
                hidden, keys = _run_preamble(decoder, self.preamble_ids, 0, stop)
            self._frozen_preamble = (tuple(keys), hidden)
        return self._frozen_preamble

    def _preamble_trainable(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the preamble in the layers from the frozen boundary up (with grad when enabled)."""
        decoder, _, _ = model_parts(model)
        frozen_keys, hidden = self._frozen_preamble_state(model)
        start = len(frozen_keys)
        # With no frozen layer the embeddings train: the preamble's embedding runs with grad each step.
        _, keys = _run_preamble(decoder, self.preamble_ids, start, len(decoder.layers),
                                hidden=hidden if start else None)
        return keys

    def _frozen_outputs(self, model, batch: dict, frozen_keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states entering the first trainable layer (shared [G, S, H], remainders [B, R, H]), from the
        cache where a group's segments are there, else computed without grad (and cached while room is left)."""
        decoder, _, _ = model_parts(model)
        embed = decoder.embed_tokens
        shared_ids, rest_ids = batch["shared_ids"], batch["rest_ids"]
        if not frozen_keys:  # nothing frozen below the first trainable layer
            return embed(shared_ids), embed(rest_ids)
        device = rest_ids.device
        group = batch["group"].tolist()
        shared_keys, suffix_keys = batch["shared_keys"], batch["suffix_keys"]
        missing = [g for g in range(len(shared_keys))
                   if shared_keys[g] not in self._cache
                   or any(suffix_keys[i] not in self._cache for i, gi in enumerate(group) if gi == g)]
        self.cache_hits += len(shared_keys) - len(missing)
        self.cache_misses += len(missing)
        computed: dict[tuple, torch.Tensor] = {}
        if missing:
            rows = [i for i, gi in enumerate(group) if gi in set(missing)]
            sub = _sub_batch(batch, missing, rows)
            geometry = _Geometry(sub, len(self.preamble_ids), device, decoder)
            with torch.no_grad():
                shared, rest = embed(sub["shared_ids"]), embed(sub["rest_ids"])
                for index in range(len(frozen_keys)):
                    shared, rest = _layer(decoder, decoder.layers[index], frozen_keys[index], shared, rest, geometry)
            # clone(): a cached entry must not keep the whole batch tensor alive
            for j, g in enumerate(missing):
                computed[shared_keys[g]] = shared[j, :int(sub["shared_len"][j])].clone()
            for j, i in enumerate(rows):
                computed[suffix_keys[i]] = rest[j, :int(sub["rest_len"][j])].clone()
            for key, value in computed.items():
                size = value.numel() * value.element_size()
                if self._cached_bytes + size <= self.cache_bytes:
                    self._cache[key] = value
                    self._cached_bytes += size

        def lookup(key):
            return computed[key] if key in computed else self._cache[key]

        hidden = embed.weight.shape[1]
        dtype = embed.weight.dtype
        shared = torch.zeros(len(shared_keys), shared_ids.shape[1], hidden, dtype=dtype, device=device)
        rest = torch.zeros(len(suffix_keys), rest_ids.shape[1], hidden, dtype=dtype, device=device)
        for g, key in enumerate(shared_keys):
            value = lookup(key)
            shared[g, :value.shape[0]] = value
        for i, key in enumerate(suffix_keys):
            value = lookup(key)
            rest[i, :value.shape[0]] = value
        return shared, rest


def _sub_batch(batch: dict, groups: list[int], rows: list[int]) -> dict:
    """The part of a collated batch that holds ``groups`` and their member ``rows`` (group indices renumbered)."""
    renumber = {g: j for j, g in enumerate(groups)}
    shared_len = batch["shared_len"][groups]
    rest_len = batch["rest_len"][rows]
    return {"shared_ids": batch["shared_ids"][groups][:, :int(shared_len.max()) if len(groups) else 0],
            "shared_len": shared_len,
            "rest_ids": batch["rest_ids"][rows][:, :int(rest_len.max())],
            "rest_len": rest_len,
            "group": torch.tensor([renumber[int(batch["group"][i])] for i in rows], dtype=torch.long)}


class _Geometry:
    """Positions, rotary (cos, sin) and masks of the segments of one batch (shared: [G, S]; remainders:
    [B, R]); the rotary tables are computed once per batch, not per layer."""

    def __init__(self, batch: dict, preamble: int, device: torch.device, decoder):
        self.preamble = preamble
        self.group = batch["group"].to(device)
        self.shared_len = batch["shared_len"].to(device)
        self.rest_len = batch["rest_len"].to(device)
        shared_width, rest_width = batch["shared_ids"].shape[1], batch["rest_ids"].shape[1]
        self.shared_pos = (torch.arange(shared_width, device=device) + preamble).unsqueeze(0).expand(
            len(self.shared_len), -1)
        self.shared_mask = torch.arange(shared_width, device=device)[None, :] < self.shared_len[:, None]
        start = preamble + self.shared_len[self.group]
        self.rest_pos = torch.arange(rest_width, device=device)[None, :] + start[:, None]
        self.rest_mask = torch.arange(rest_width, device=device)[None, :] < self.rest_len[:, None]
        self.last = self.rest_len - 1  # the verdict position inside each remainder
        like = decoder.embed_tokens.weight[:1]
        self.shared_rope = decoder.rotary_emb(like, self.shared_pos)
        self.rest_rope = decoder.rotary_emb(like, self.rest_pos)
        rows = torch.arange(len(self.rest_len), device=device)
        self.last_rope = decoder.rotary_emb(like, self.rest_pos[rows, self.last].unsqueeze(1))


def _run_preamble(decoder, ids: Sequence[int], start: int, stop: int, hidden: torch.Tensor | None = None):
    """Run the preamble (batch 1) through layers [start, stop): (hidden after them, per-layer keys/values).
    ``hidden`` is its input to layer ``start`` (None: the embeddings)."""
    device = decoder.embed_tokens.weight.device
    tokens = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    if hidden is None:
        hidden = decoder.embed_tokens(tokens)
    positions = torch.arange(len(ids), device=device).unsqueeze(0)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()[None, None]
    keys = []
    last = len(decoder.layers) - 1
    cos, sin = decoder.rotary_emb(hidden, positions)
    for index in range(start, stop):
        layer = decoder.layers[index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q, k, v = _project(attn, normed, cos, sin, queries=index != last)
        keys.append((k, v))
        if index == last:  # nothing reads the preamble's own output of the last layer
            break
        out = _attend(attn, q, k, v, causal)
        hidden = _finish_layer(layer, hidden, out)
    return hidden, keys


def _project(attn, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, queries: bool = True):
    """Rotated (q, k, v) [B, heads, T, head_dim] of an attention module (q None when not asked for)."""
    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, n * d] -> [B, n, T, d] (T may be 0)
        return x.view(*x.shape[:-1], x.shape[-1] // attn.head_dim, attn.head_dim).transpose(1, 2)

    k, v = heads(attn.k_proj(normed)), heads(attn.v_proj(normed))
    q = heads(attn.q_proj(normed)) if queries else k[:, :1]  # no queries: rotate a one-head stand-in
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return (q if queries else None), k, v


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v with grouped-query heads; returns [B, T, heads * head_dim]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _finish_layer(layer, residual: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, post-attention norm, MLP, residual (the decoder layer after attention)."""
    hidden = residual + layer.self_attn.o_proj(attention)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _segment_keys(decoder, layer, shared: torch.Tensor, rest: torch.Tensor, geo: _Geometry, queries: bool):
    """(q, k, v) of the shared segments and the remainders at one layer."""
    attn = layer.self_attn
    shared_n, rest_n = layer.input_layernorm(shared), layer.input_layernorm(rest)
    shared_qkv = _project(attn, shared_n, *geo.shared_rope, queries)
    rest_qkv = _project(attn, rest_n, *geo.rest_rope, queries)
    return shared_qkv, rest_qkv, rest_n


def _keys_for_rest(preamble_kv, shared_kv, rest_k, rest_v, geo: _Geometry):
    """Keys/values each remainder attends to: preamble | its group's shared segment | itself."""
    pk, pv = preamble_kv
    batch = rest_k.shape[0]
    k = torch.cat([pk.expand(batch, -1, -1, -1), shared_kv[0][geo.group], rest_k], dim=2)
    v = torch.cat([pv.expand(batch, -1, -1, -1), shared_kv[1][geo.group], rest_v], dim=2)
    return k, v


def _layer(decoder, layer, preamble_kv, shared: torch.Tensor, rest: torch.Tensor, geo: _Geometry):
    """One decoder layer over the shared segments and the remainders (every position)."""
    attn = layer.self_attn
    (sq, sk, sv), (rq, rk, rv), _ = _segment_keys(decoder, layer, shared, rest, geo, queries=True)
    pk, pv = preamble_kv
    groups, width = shared.shape[0], shared.shape[1]
    if width:
        causal = torch.ones(width, width, dtype=torch.bool, device=shared.device).tril()
        mask = torch.cat([torch.ones(groups, width, pk.shape[2], dtype=torch.bool, device=shared.device),
                          causal[None] & geo.shared_mask[:, None, :]], dim=2)[:, None]
        out = _attend(attn, sq, torch.cat([pk.expand(groups, -1, -1, -1), sk], 2),
                      torch.cat([pv.expand(groups, -1, -1, -1), sv], 2), mask)
        shared = _finish_layer(layer, shared, out)
    k, v = _keys_for_rest(preamble_kv, (sk, sv), rk, rv, geo)
    rest_width = rest.shape[1]
    causal = torch.ones(rest_width, rest_width, dtype=torch.bool, device=rest.device).tril()
    mask = torch.cat([torch.ones(rest.shape[0], rest_width, pk.shape[2], dtype=torch.bool, device=rest.device),
                      geo.shared_mask[geo.group][:, None, :].expand(-1, rest_width, -1),
                      causal[None] & geo.rest_mask[:, None, :]], dim=2)[:, None]
    rest = _finish_layer(layer, rest, _attend(attn, rq, k, v, mask))
    return shared, rest


def _last_layer(decoder, layer, preamble_kv, shared: torch.Tensor, rest: torch.Tensor, geo: _Geometry):
    """The last decoder layer at the verdict positions only: keys/values everywhere, the rest at one token."""
    attn = layer.self_attn
    (_, sk, sv), (_, rk, rv), rest_n = _segment_keys(decoder, layer, shared, rest, geo, queries=False)
    rows = torch.arange(rest.shape[0], device=rest.device)
    at = rest_n[rows, geo.last].unsqueeze(1)  # [B, 1, H]
    q = attn.q_proj(at).view(at.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q[:, :1], *geo.last_rope)
    k, v = _keys_for_rest(preamble_kv, (sk, sv), rk, rv, geo)
    mask = torch.cat([torch.ones(rest.shape[0], preamble_kv[0].shape[2], dtype=torch.bool, device=rest.device),
                      geo.shared_mask[geo.group], geo.rest_mask], dim=1)[:, None, None, :]
    out = _attend(attn, q, k, v, mask)
    return _finish_layer(layer, rest[rows, geo.last].unsqueeze(1), out)[:, 0]
