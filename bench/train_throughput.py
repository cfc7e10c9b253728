"""Stage-2 training speed: a naive trainer against ours on the same examples and trainable layers.

One round = forward + backward over every example as the demo's optimizer steps (each step one micro-batch
of --batch-size sequences, 4 pairs x 2 orders; no optimizer update, so every round sees the same weights).
All sides compute the same global mean loss (label-smoothed two-way CE on the verdict logits), so their
first-step losses must agree; the bench fails if they differ by more than 1e-4.
  naive  full sequences (instruction prefix included), padded batches in data order, the LM head's
         full-vocabulary logits at every position, then the answer position's A/B columns
  today  gram_core.training with train.shared_segments off: length-grouped batches, the shared prefix run
         once per step (forward and backward) with its KV reused, the decoder's last hidden state times the
         A/B rows of the LM head only
  shared train.shared_segments on (gram_core.shared_forward): today's path, plus each pair's common prefix
         run once for both slot orders, the frozen layers without grad over the instruction once per run, the
         last layer at the verdict position only. "cold": the frozen layers run over every sequence (a
         sequence's first visit); "warm": their outputs come from the per-run cache (a revisit, as in a run of
         more than one epoch)
Pairs go in both slot orders in the same micro-batch, as the demo does (encode.order both, batch 8 = 4
pairs). Throughput counts every real token of every full sequence (prefix included) for all, so tokens/s
compare directly. Rounds alternate the trainers; each keeps its fastest round (robust to load on a shared
machine). ``--blend R`` also prints the shared path's rate for a run in which a share R of the pair visits are
revisits (the demo: 240 steps x 4 pairs over 728 pairs, R = 0.24).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.train_throughput [--pairs 24] [--data starter|file.parquet]
        [--max-length 512] [--top-layers 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from gram_core.batching import length_grouped_batches, pad_right
from gram_core.config import ModelConfig
from gram_core.encoding import JudgeEncoder, encode_preference_pairs
from gram_core.losses import judge_loss
from gram_core.models import load_model
from gram_core.shared_forward import collate_shared_judge
from gram_core.starter import starter_preferences
from gram_core.steps import collate_judge, judge_step_fn, shared_judge_step_fn

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences_train.parquet"


def naive_step(model, examples, prefix, label_ids, pad_id, batch_size, smoothing) -> float:
    """Data-order padded batches of full sequences, full-vocab logits everywhere; returns the mean loss."""
    total, n = 0.0, len(examples)
    for start in range(0, n, batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask = pad_right([list(prefix) + list(ex["suffix_ids"]) for ex in chunk], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        last = logits[torch.arange(len(chunk)), mask.sum(1) - 1]
        z = last[:, list(label_ids)]
        loss = judge_loss(z, torch.tensor([ex["label"] for ex in chunk]), smoothing)
        (loss * len(chunk) / n).backward()
        total += float(loss.detach()) * len(chunk)
    return total / n


def our_step(model, examples, step_fn, collate, batch_size) -> float:
    """The demo's optimizer steps over the examples (forward and backward, no update): each step one micro-batch
    of whole pairs (both orders together), its shared prefix run once (as ``training.train`` does with
    grad_accum_steps 1), answer-only logits."""
    pair_lengths = [len(examples[i]["suffix_ids"]) for i in range(0, len(examples), 2)]
    total, n = 0.0, len(examples)
    for pairs in length_grouped_batches(pair_lengths, batch_size // 2, seed=0, shuffle=False):
        batch = [i for p in pairs for i in (2 * p, 2 * p + 1)]
        step_fn.step_prefix.begin(model)
        loss, _ = step_fn(model, collate([examples[i] for i in batch]))
        (loss * len(batch) / n).backward()
        step_fn.step_prefix.finish()
        total += float(loss.detach()) * len(batch)
    return total / n


def timed(fn, model) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = fn()
    return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="starter", help="preference pairs (prompt, chosen, rejected): a Parquet "
                        "file, or 'starter' (the demo's built-in training pairs, the default), e.g. " + str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--top-layers", type=int, default=10, help="trainable decoder layers (the rest frozen)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (pairs x 2 orders)")
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each side keeps its fastest")
    parser.add_argument("--blend", type=float, default=0.24, help="share of pair visits that are revisits")
    args = parser.parse_args()

    probe, _ = load_model(ModelConfig(source=args.source))
    layers = len(probe.model.layers)
    del probe
    model, tokenizer = load_model(ModelConfig(source=args.source, freeze_layers=layers - args.top_layers))
    model.train()
    table = starter_preferences() if args.data == "starter" else pq.read_table(args.data)
    rows = table.slice(0, args.pairs).to_pylist()
    rows = [{"pair_id": str(i), "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for i, r in enumerate(rows)]
    encoder = JudgeEncoder(tokenizer, args.max_length)
    examples, _ = encode_preference_pairs(encoder, rows, order="both")
    prefix, pad_id, smoothing = encoder.prefix_ids, tokenizer.pad_token_id, 0.1
    tokens = sum(len(prefix) + len(ex["suffix_ids"]) for ex in examples)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    padded = sum(len(prefix) + max(len(ex["suffix_ids"]) for ex in examples[s:s + args.batch_size])
                 for s in range(0, len(examples), args.batch_size) for _ in examples[s:s + args.batch_size])
    print(f"model {args.source}, fp32, {torch.get_num_threads()} threads; top {args.top_layers} of {layers} layers "
          f"trainable ({trainable / 1e6:.1f}M params); {len(examples) // 2} pairs in both orders from {Path(args.data).name}, "
          f"{tokens / len(examples):.0f} tokens a sequence on average (prefix {len(prefix)}); naive padding "
          f"{100 * (1 - tokens / padded):.0f}% of its tokens; micro-batch {args.batch_size}")

    step_fn = judge_step_fn(encoder.label_ids, prefix, smoothing, reuse_prefix=True)
    cold = shared_judge_step_fn(encoder.label_ids, prefix, smoothing, cache_bytes=0)
    warm = shared_judge_step_fn(encoder.label_ids, prefix, smoothing, cache_bytes=1 << 32)
    our_step(model, examples, warm, collate_shared_judge(pad_id), args.batch_size)  # fills warm's cache
    sides = {"naive": lambda: naive_step(model, examples, prefix, encoder.label_ids, pad_id, args.batch_size,
                                         smoothing),
             "today": lambda: our_step(model, examples, step_fn, collate_judge(pad_id), args.batch_size),
             "cold": lambda: our_step(model, examples, cold, collate_shared_judge(pad_id), args.batch_size),
             "warm": lambda: our_step(model, examples, warm, collate_shared_judge(pad_id), args.batch_size)}
    best = {name: float("inf") for name in sides}
    losses = {}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            seconds, loss = timed(fn, model)
            best[name] = min(best[name], seconds)
            losses.setdefault(name, loss)
    print(f"{'trainer':8s} {'seconds':>8s} {'tokens/s':>9s} {'vs today':>9s} {'first-step loss':>16s}")
    for name in sides:
        print(f"{name:8s} {best[name]:8.2f} {tokens / best[name]:9.1f} {best['today'] / best[name]:8.2f}x "
              f"{losses[name]:16.6f}")
    blended = (1 - args.blend) * best["cold"] + args.blend * best["warm"]
    print(f"shared, {args.blend:.0%} revisits: {tokens / blended:.1f} tokens/s, {best['today'] / blended:.2f}x today "
          f"({best['naive'] / blended:.2f}x naive); today {best['naive'] / best['today']:.2f}x naive")
    gap = max(abs(losses[name] - losses["today"]) for name in sides)
    print(f"largest |first-step loss difference| from today: {gap:.1e}")
    if gap > 1e-4:
        raise SystemExit(f"first-step losses differ by {gap:.2e} (> 1e-4): the trainers do not compute the same")


if __name__ == "__main__":
    main()
