"""Sample responses from a policy model for stage-1 pairs (METHOD.md section 2: "sample k responses per
prompt from one or more policy models, pair them up").

Reproducibility: every (prompt, sample index) row draws its tokens from its own ``torch.Generator``, seeded
from (seed, prompt_id, index). Decoding itself is greedy over logits in which a logits processor has
already made the sampled token the only finite one, so a row's text does not depend on which other rows
share its batch or on the batch size (up to float differences from padding, which almost never flip a
draw).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable

import pyarrow as pa
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from data_contracts import RESPONSE_POOL
from gram_core.config import check, field

log = logging.getLogger(__name__)

RESPONSE_POOL_COLUMNS = tuple(RESPONSE_POOL.schema.names)
STATS_PREFIX = "gram.sampling."
TOPK_PREFILTER = 512


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    models: tuple[str, ...] = field(("smollm2",), "Policy model sources to sample from (each is resolved "
                                    "like model.source; the model name becomes the `generator` column).")
    k: int = field(4, "Responses sampled per prompt and model.")
    temperature: float = field(0.8, "Softmax temperature; 0 = greedy (then all k responses are identical).")
    top_p: float = field(0.95, "Nucleus sampling: keep the smallest token set with this much probability.")
    max_new_tokens: int = field(128, "Maximum generated tokens per response.")
    batch_size: int = field(8, "Sequences generated together (prompt x sample rows).")
    seed: int = field(0, "Seed of every row's token draws (with the prompt id and the sample index).")

    def __post_init__(self) -> None:
        check(len(self.models) >= 1, "sampling.models", "name at least one model source")
        check(self.k >= 1, "sampling.k", f"must be >= 1, got {self.k}")
        check(self.temperature >= 0, "sampling.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "sampling.batch_size", f"must be >= 1, got {self.batch_size}")


def prompt_id(prompt: str) -> str:
    """First 16 hex characters of the SHA-256 of the UTF-8 prompt (as in ../shared/data)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def row_seed(seed: int, pid: str, index: int) -> int:
    """Seed of one (prompt, sample index) row: independent of batch composition and order."""
    digest = hashlib.sha256(f"{seed}:{pid}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowSampler(LogitsProcessor):
    """Draw each row's next token with that row's generator (temperature, then top-p), and return logits
    where only the drawn token is finite, so greedy decoding emits exactly the draw."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature == 0:
            chosen = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores / self.temperature, dim=-1)
            # The nucleus almost always lies in the top few hundred tokens; sort everything only if not.
            top, order = probs.topk(min(TOPK_PREFILTER, probs.shape[-1]), dim=-1)
            if (top.sum(dim=-1) < self.top_p).any():
                top, order = probs.sort(dim=-1, descending=True)
            # Keep a token while the mass before it is < top_p (the top token always stays).
            top = top * ((top.cumsum(dim=-1) - top) < self.top_p)
            cdf = top.cumsum(dim=-1)
            # Inverse-CDF draw with one uniform number from each row's own generator.
            uniform = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device)
            pick = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True)
            pick = pick.clamp(max=cdf.shape[-1] - 1)
            chosen = order.gather(-1, pick).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return out


def render_generation_prompt(tokenizer, prompt: str) -> str:
    """The prompt as one user turn in the tokenizer's chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                         "sampling needs one to render prompts as user turns")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _generate_batch(model, tokenizer, texts: list[str], generators: list[torch.Generator], *,
                    temperature: float, top_p: float, max_new_tokens: int) -> list[str]:
    """Left-padded batched generation; returns the decoded continuations (special tokens removed)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        output = model.generate(input_ids=enc["input_ids"].to(device),
                                attention_mask=enc["attention_mask"].to(device),
                                generation_config=gen_config,
                                logits_processor=LogitsProcessorList([RowSampler(generators, temperature, top_p)]))
    new_tokens = output[:, enc["input_ids"].shape[1]:].cpu()
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def sample_responses(model, tokenizer, prompts: list[str], *, k: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, batch_size: int, generator_name: str,
                     source: str = "sampled", progress: Callable[[int, int], None] | None = None) -> pa.Table:
    """Sample ``k`` responses per prompt; returns a response-pool table (prompt_id, prompt, response,
    generator, source); duplicate prompts are sampled once. Responses are stripped of special tokens and whitespace; empty ones are dropped and
    counted. Counts are in the schema metadata (``sampling_stats(table)``). ``progress(done, total)`` is
    called after every batch with row counts."""
    check(k >= 1, "sample_responses.k", f"must be >= 1, got {k}")
    check(batch_size >= 1, "sample_responses.batch_size", f"must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set one (gram_core.models.load_tokenizer does) "
                         "before batched sampling")
    unique = list(dict.fromkeys(prompts))  # a repeated prompt would repeat its samples exactly (same row seeds)
    if len(unique) < len(prompts):
        log.info("sampling %s: %d duplicate prompts ignored", generator_name, len(prompts) - len(unique))
    rows = [(prompt, prompt_id(prompt), index) for prompt in unique for index in range(k)]
    rendered = {prompt: render_generation_prompt(tokenizer, prompt) for prompt in unique}
    was_training = model.training
    model.eval()
    out: dict[str, list[str]] = {name: [] for name in RESPONSE_POOL_COLUMNS}
    dropped_empty = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            generators = [torch.Generator().manual_seed(row_seed(seed, pid, index)) for _, pid, index in batch]
            texts = _generate_batch(model, tokenizer, [rendered[p] for p, _, _ in batch], generators,
                                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
            for (prompt, pid, _), text in zip(batch, texts, strict=True):
                text = text.strip()
                if not text:
                    dropped_empty += 1
                    continue
                for name, value in zip(RESPONSE_POOL_COLUMNS, (pid, prompt, text, generator_name, source),
                                       strict=True):
                    out[name].append(value)
            if progress is not None:
                progress(min(start + batch_size, len(rows)), len(rows))
    finally:
        model.train(was_training)
    if dropped_empty:
        log.info("sampling %s: dropped %d empty responses of %d", generator_name, dropped_empty, len(rows))
    schema = RESPONSE_POOL.schema.with_metadata({**RESPONSE_POOL.schema.metadata,
                                                 f"{STATS_PREFIX}generated": str(len(rows)),
                                                 f"{STATS_PREFIX}dropped_empty": str(dropped_empty)})
    return pa.Table.from_pydict(out, schema=schema)


def sampling_stats(table: pa.Table) -> dict[str, int]:
    """Counts recorded by ``sample_responses`` (generated, dropped_empty, kept)."""
    meta = table.schema.metadata or {}
    stats = {key.decode()[len(STATS_PREFIX):]: int(value) for key, value in meta.items()
             if key.decode().startswith(STATS_PREFIX)}
    stats["kept"] = table.num_rows
    return stats
