"""Judge scoring speed: shared-prefix KV reuse and answer-only logits, side by side in one run.

Scores the same judge sequences (real SmolLM2-135M-Instruct, fp32, CPU by default) five ways, interleaved
batch by batch, each batch keeping its fastest of --repeats rounds (robust to load on a shared machine):
  full ids + full-vocab logits   the naive way: model(...).logits [B, T, V], then pick the answer position
  full ids + answer-only         forward.answer_logits without a prefix (LM-head rows of A/B only)
  prefix per call + answer-only  the prefix run once per batch (batch 1, as in training)
  cached prefix + answer-only    one PrefixCache reused for every batch (judging)
  cached prefix + full-vocab     the cached prefix, but full-vocab logits over every suffix position
Throughput counts every token of every full sequence (prefix included), so the numbers compare directly.

With ``--real PARQUET`` (RewardBench format, e.g. ../shared/data/rewardbench_lite.parquet) it instead scores
real pairs in both slot orders at --max-length (1024 by default), end to end, two ways:
  naive  full ids, padded batches in data order, full-vocabulary logits, softmax over the A/B columns
  ours   gram_core.judging.Judge.preference (encoding included): length-grouped batches, cached prefix,
         answer-only logits
and prints pairs/s and their ratio; the bench fails unless every P(chosen) agrees to 1e-5.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.judge_prefix [--pairs 32] [--batch-size 8]
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.judge_prefix --real ../shared/data/rewardbench_lite.parquet --pairs 16
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gram_core.batching import length_grouped_batches, pad_right
from gram_core.config import JudgeConfig, ModelConfig
from gram_core.encoding import JudgeEncoder
from gram_core.forward import answer_logits, build_prefix_cache, expanded_prefix_kwargs, model_parts
from gram_core.judging import Judge
from gram_core.models import load_model

WORDS = ("the model answer question because water light energy people often would should explain reason "
         "simple example first second result value function number list city history science write code "
         "return error careful small large quickly however therefore also which where when data test").split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def make_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Prompts of ~8-16 words and responses of ~20-45 words: ~300-token judge sequences for SmolLM2."""
    rng = random.Random(seed)
    return [(sentence(rng, rng.randint(8, 16)) + " Why?",
             " ".join(sentence(rng, rng.randint(8, 12)) for _ in range(rng.randint(2, 4))),
             " ".join(sentence(rng, rng.randint(8, 12)) for _ in range(rng.randint(2, 4))))
            for _ in range(n)]


def full_vocab_full(model, ids, mask, label_ids, _prefix):
    """Naive: every position's full-vocabulary logits, then the last real token's label columns."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[torch.arange(len(ids)), mask.sum(1) - 1][:, list(label_ids)]


def full_vocab_cached(model, ids, mask, label_ids, prefix):
    """Cached prefix, but the causal LM's own head over every suffix position."""
    decoder, _, _ = model_parts(model)
    batch, width = ids.shape
    full_mask = torch.cat([torch.ones(batch, prefix.length, dtype=mask.dtype), mask], dim=1)
    positions = (torch.arange(width) + prefix.length).unsqueeze(0).expand(batch, -1)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                   **expanded_prefix_kwargs(decoder, prefix.layers, batch)).logits
    return logits[torch.arange(batch), mask.sum(1) - 1][:, list(label_ids)]


def answer_only(model, ids, mask, label_ids, prefix):
    return answer_logits(model, ids, mask, label_ids, prefix=prefix)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn(*args)
    return time.perf_counter() - start, out


def naive_preference(model, encoder, pad_id, rows, batch_size) -> np.ndarray:
    """P(chosen) the naive way: both orders' full ids in data order, full-vocab logits, A/B softmax."""
    n = len(rows)
    seqs = [encoder.full_ids(encoder.encode(r["prompt"], a, b)) for a, b, r in
            [(r["chosen"], r["rejected"], r) for r in rows] + [(r["rejected"], r["chosen"], r) for r in rows]]
    p_a = np.empty(len(seqs))
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[start:start + batch_size], pad_id)
            z = full_vocab_full(model, ids, mask, encoder.label_ids, None)
            p_a[start:start + len(ids)] = torch.softmax(z.double(), dim=-1)[:, 0].numpy()
    return (p_a[:n] + (1.0 - p_a[n:])) / 2


def real_pairs(args, model, tokenizer) -> None:
    """Naive scorer against ours on real RewardBench-format pairs (see the module docstring)."""
    rows = pq.read_table(args.real).slice(0, args.pairs).to_pylist()
    judge = Judge(model, tokenizer, JudgeConfig(batch_size=args.batch_size, max_length=args.max_length))
    encoder = judge.encoder
    full = [len(encoder.full_ids(encoder.encode(r["prompt"], r["chosen"], r["rejected"]))) for r in rows]
    padded = sum(max(full[s:s + args.batch_size]) * len(full[s:s + args.batch_size])
                 for s in range(0, len(full), args.batch_size))
    print(f"model {args.source}, fp32, {torch.get_num_threads()} threads; {len(rows)} pairs x 2 orders from "
          f"{Path(args.real).name} at max length {args.max_length}: {np.mean(full):.0f} tokens per sequence "
          f"(prefix {len(encoder.prefix_ids)}, {100 * len(encoder.prefix_ids) / np.mean(full):.0f}%); naive padding "
          f"{100 * (1 - sum(full) / padded):.0f}% of its tokens; batch size {args.batch_size}")
    sides = {"naive": lambda: naive_preference(model, encoder, tokenizer.pad_token_id, rows, args.batch_size),
             "ours": lambda: judge.preference([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                              [r["rejected"] for r in rows]).p}
    best, scores = {name: float("inf") for name in sides}, {}
    for _ in range(args.repeats):  # alternate the sides; each keeps its fastest round
        for name, fn in sides.items():
            start = time.perf_counter()
            scores[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    for name in sides:
        print(f"{name:6s} {best[name]:8.2f} s {len(rows) / best[name]:8.3f} pairs/s")
    gap = float(np.abs(scores["naive"] - scores["ours"]).max())
    print(f"pairs/s ratio ours/naive: {best['naive'] / best['ours']:.2f}x  (max |dP(chosen)| {gap:.1e})")
    if gap > 1e-5:
        raise SystemExit(f"scores differ by {gap:.2e} (> 1e-5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each batch keeps its fastest round")
    parser.add_argument("--real", help="RewardBench-format Parquet: naive scorer against ours on its pairs")
    parser.add_argument("--max-length", type=int, default=1024, help="judge max length (with --real)")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelConfig(source=args.source))
    model.eval()
    if args.real:
        real_pairs(args, model, tokenizer)
        return
    encoder = JudgeEncoder(tokenizer, max_length=1024)
    encodings = [encoder.encode(*pair) for pair in make_pairs(args.pairs, args.seed)]
    full = [encoder.full_ids(e) for e in encodings]
    suffixes = [e.suffix_ids for e in encodings]
    total_tokens = sum(len(s) for s in full)
    batches = length_grouped_batches([len(s) for s in full], args.batch_size, seed=0, shuffle=False)
    pad_id = tokenizer.pad_token_id
    print(f"model {args.source}, fp32, {torch.get_num_threads()} threads; {args.pairs} sequences, "
          f"{total_tokens / args.pairs:.0f} tokens each on average (prefix {len(encoder.prefix_ids)}), "
          f"batch size {args.batch_size}")

    with torch.inference_mode():  # warm-up (allocator, kernels) on one small batch
        ids, mask = pad_right(full[:2], pad_id)
        answer_logits(model, ids, mask, encoder.label_ids)

    cache_seconds, cache = timed(build_prefix_cache, model, encoder.prefix_ids)

    modes = [("full ids + full-vocab logits", full, full_vocab_full, None),
             ("full ids + answer-only", full, answer_only, None),
             ("prefix per call + answer-only", suffixes, answer_only, list(encoder.prefix_ids)),
             ("cached prefix + full-vocab", suffixes, full_vocab_cached, cache),
             ("cached prefix + answer-only", suffixes, answer_only, cache)]
    # Modes run interleaved batch by batch and each batch keeps its fastest round, so load from other
    # processes on a shared machine hits every mode alike instead of whichever ran during a busy minute.
    best = {name: [float("inf")] * len(batches) for name, *_ in modes}
    logits = {name: torch.empty(len(full), 2) for name, *_ in modes}
    for _ in range(args.repeats):
        cache_seconds = min(cache_seconds, timed(build_prefix_cache, model, encoder.prefix_ids)[0])
        for b, batch in enumerate(batches):
            for name, seqs, fn, prefix in modes:
                ids, mask = pad_right([seqs[i] for i in batch], pad_id)
                seconds, z = timed(fn, model, ids, mask, encoder.label_ids, prefix)
                best[name][b] = min(best[name][b], seconds)
                logits[name][batch] = z.float()
    # The one-off prefix forward is part of the cached modes' cost.
    results = [(name, sum(best[name]) + (cache_seconds if name.startswith("cached") else 0.0), logits[name])
               for name, *_ in modes]

    base_seconds, base_logits = results[0][1], results[0][2]
    print(f"{'mode':32s} {'seconds':>8s} {'tokens/s':>9s} {'speed-up':>9s} {'max |dz|':>9s}")
    for name, seconds, logits in results:
        print(f"{name:32s} {seconds:8.2f} {total_tokens / seconds:9.0f} {base_seconds / seconds:8.2f}x "
              f"{(logits - base_logits).abs().max().item():9.1e}")
    by_name = {name: seconds for name, seconds, _ in results}
    print(f"answer-only vs full-vocab (full ids):     "
          f"{by_name['full ids + full-vocab logits'] / by_name['full ids + answer-only']:.2f}x")
    print(f"cached prefix vs full ids (answer-only):  "
          f"{by_name['full ids + answer-only'] / by_name['cached prefix + answer-only']:.2f}x")
    print(f"cached prefix vs prefix per call:         "
          f"{by_name['prefix per call + answer-only'] / by_name['cached prefix + answer-only']:.2f}x")


if __name__ == "__main__":
    main()
