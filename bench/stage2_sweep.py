"""Stage-2 sweep: train the judge in-process on starter pairs with one setting, then score the leak-free
starter eval in both orders. One JSON line per setting (final train loss, accuracies, consistency, minutes).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.stage2_sweep --name top10-lr3e-5 \\
        --set model.freeze_layers=20 --set finetune.learning_rate=3e-5 [--pairs 608] [--eval-limit 160]

``--set`` takes the pipeline's own keys (model.*, encode.*, finetune.*) on top of the demo preset, so a
winning setting is a preset edit. ``--pairs 32 --eval-limit 0 --eval-train`` is the overfit check (scores the
training pairs themselves). Run settings one after another, never two at once (2 cores: timings).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gram_core.evidence import accuracy_interval, starter_clusters
from gram_core.judging import Judge
from gram_core.losses import optimal_margin
from gram_core.models import load_model
from gram_core.plans import train_judge
from gram_core.rewardbench import position_consistency
from gram_core.scorers import score_table
from gram_core.starter import HELDOUT_SUBSETS, starter_eval, starter_preferences
from tasks.settings import load_preset


def stratified(table, limit: int, seed: int):
    """The pipeline's stratified eval sample (same rows as `eval.limit`; held-out subsets in full)."""
    from gram_core.sources import limit_rows

    return limit_rows(table, limit, seed, stratify="subset", whole=HELDOUT_SUBSETS)


def _kept(scores, keep, clusters=None) -> tuple[list[float], list | None]:
    """The correct flags (1/0) of the rows whose subset ``keep`` accepts, and their cluster keys."""
    subsets, correct = scores.column("subset").to_pylist(), scores.column("correct").to_pylist()
    rows = [i for i, s in enumerate(subsets) if keep(s)]
    return [float(correct[i]) for i in rows], [clusters[i] for i in rows] if clusters else None


def accuracy(scores, keep) -> float | None:
    values, _ = _kept(scores, keep)
    return float(np.mean(values)) if values else None


def accuracy_bars(scores, keep, clusters) -> list[float] | None:
    """[low, high]: the template-cluster bootstrap interval (gram_core.evidence) of ``accuracy``."""
    values, keys = _kept(scores, keep, clusters)
    if not values:
        return None
    bars = accuracy_interval(values, keys)
    return [round(bars["low"], 4), round(bars["high"], 4)]


def readout(scores, clusters=None) -> dict:
    """Accuracies (overall, in-distribution, held-out, per subset) with 95 % intervals, and consistency;
    ``clusters``: a template key per row of ``scores`` (gram_core.evidence.starter_clusters) or None."""
    parts = {"accuracy": lambda s: True, "in_distribution": lambda s: s not in HELDOUT_SUBSETS,
             "heldout": lambda s: s in HELDOUT_SUBSETS}
    return {**{name: accuracy(scores, keep) for name, keep in parts.items()},
            **{f"{name}_interval": accuracy_bars(scores, keep, clusters) for name, keep in parts.items()},
            "subsets": {s: accuracy(scores, lambda x, s=s: x == s)
                        for s in dict.fromkeys(scores.column("subset").to_pylist())},
            "position_consistency": position_consistency(scores)}


def steps_below(losses: list[float], level: float, window: int = 5) -> int | None:
    """The first step whose trailing mean loss over ``window`` steps is below ``level`` (None: never)."""
    for end in range(window, len(losses) + 1):
        if np.mean(losses[end - window:end]) < level:
            return end
    return None


def eval_table(args, rows: list[dict], cfg):
    if args.eval_train:
        import pyarrow as pa

        return pa.Table.from_pylist([{**r, "id": r["pair_id"], "subset": r["source"]} for r in rows])
    table = starter_eval()
    return stratified(table, args.eval_limit, cfg.eval.seed) if args.eval_limit else table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], help="preset override key.path=value")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--pairs", type=int, default=0, help="train on the first N starter pairs (0 = all)")
    parser.add_argument("--eval-limit", type=int, default=160)
    parser.add_argument("--eval-train", action="store_true", help="score the training pairs instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also score the eval set every N steps (the frontier: accuracy vs minutes of training)")
    parser.add_argument("--out", default="bench/results/stage2_sweep.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_preset(args.preset, args.set)
    rows = starter_preferences().to_pylist()
    if args.pairs:
        rows = rows[: args.pairs] if args.pairs >= len(rows) else [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[: args.pairs]]
    began = time.time()
    model, tokenizer = load_model(cfg.model)
    table = eval_table(args, rows, cfg)
    clusters = starter_clusters(table.to_pylist())
    frontier, paused = [], [0.0]

    def show(step: int, metrics: dict) -> None:
        if step % 10 == 0:
            print(f"  step {step}: loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.2f} "
                  f"({(time.time() - began) / 60:.1f} min)", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            t = time.time()
            point = {"step": step, "train_minutes": round((t - began - paused[0]) / 60, 2),
                     **readout(score_table(Judge(model, tokenizer, cfg.judge), table), clusters)}
            paused[0] += time.time() - t  # scoring time is not training time
            frontier.append(point)
            print(f"  frontier {json.dumps(point)}", flush=True)

    result = train_judge(model, tokenizer, rows, cfg.finetune, cfg.encode, on_metrics=show)
    train_minutes = (time.time() - began - paused[0]) / 60
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    final = frontier[-1] if frontier and frontier[-1]["step"] == result.steps else None
    scores = None if final else score_table(Judge(base, tokenizer, cfg.judge), table)
    last = result.history[-max(1, len(result.history) // 10):]  # the last 10 % of steps
    record = {
        "name": args.name, "overrides": args.set, "pairs": len(rows), "steps": result.steps,
        "final_train_loss": float(np.mean([h["train/loss"] for h in last])),
        "final_train_accuracy": float(np.mean([h["train/accuracy"] for h in last])),
        "final_margin": float(np.mean([h["train/margin"] for h in last])),
        "loss_floor": float(np.log1p(np.exp(-optimal_margin(cfg.finetune.label_smoothing)))
                            + cfg.finetune.label_smoothing / 2 * optimal_margin(cfg.finetune.label_smoothing))
        if cfg.finetune.label_smoothing else 0.0,
        "eval_rows": table.num_rows, "eval": "train pairs" if args.eval_train else "starter eval",
        **({k: v for k, v in final.items() if k not in ("step", "train_minutes")} if final else readout(scores, clusters)),
        "frontier": frontier,
        "train_minutes": round(train_minutes, 2), "total_minutes": round((time.time() - began) / 60, 2),
        "steps_to_loss_0.6": steps_below([h["train/loss"] for h in result.history], 0.6),
        "loss_curve": [round(h["train/loss"], 4) for h in result.history],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    shown = {k: v for k, v in record.items() if k not in ("loss_curve", "subsets")}
    print(json.dumps(shown))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
