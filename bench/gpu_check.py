"""GPU check (one H100/H200, under 8 minutes): what the CPU tests cannot show.

1. Stage-2 training of SmolLM2 (all weights trainable) through gram_core.training.train: fp32 master
   weights, bf16 autocast. Prints tokens/s and MFU (model FLOPs 6·N per processed token against the GPU's
   dense bf16 peak), and checks every parameter stayed fp32 and moved.
2. Judge throughput in bf16 (cached prefix, answer-only logits) on real RewardBench-format pairs: pairs/s.
3. bf16-vs-fp32 agreement of the judge's P(chosen) on the same pairs (max |dP|, decisions that flip).
4. FSDP2 on one GPU (a 1-process group): gram_core.sharding.shard_model over the stage-2 step with bf16
   mixed precision, a few optimizer steps against the same steps unsharded (losses, peak memory, s/step).

    HF_HUB_OFFLINE=1 python -m bench.gpu_check [--source smollm2] [--pairs 64] [--steps 20]

``--device cpu --source tiny`` runs the same code paths on a CPU in seconds (no figures worth keeping).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gram_core.config import EncodeConfig, JudgeConfig, ModelConfig, TrainConfig
from gram_core.encoding import JudgeEncoder
from gram_core.judging import Judge
from gram_core.models import load_model
from gram_core.plans import train_judge

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STARTER = Path(__file__).resolve().parents[1] / "gram_core" / "starter"
# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment; override with --peak-tflops.
BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def pairs(path: Path, n: int, preference: bool) -> list[dict]:
    rows = pq.read_table(path).slice(0, n).to_pylist()
    key = "pair_id" if preference else "id"
    return [{key: str(r.get("pair_id", r.get("id", i))), "prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": r["rejected"]} for i, r in enumerate(rows)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_check(args, device: torch.device) -> dict:
    model, tokenizer = load_model(ModelConfig(source=args.source, dtype="float32"))
    model.to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = pairs(args.train_data, args.steps * args.batch_size, preference=True)
    config = TrainConfig(learning_rate=2e-5, max_steps=args.steps, batch_size=args.batch_size, warmup_ratio=0.0,
                         precision="bf16")
    seen = []
    sync(device)
    result = train_judge(model, tokenizer, rows, config, EncodeConfig(max_length=args.max_length),
                         on_metrics=lambda step, m: (sync(device), seen.append(time.perf_counter())))
    # Steady state: skip the first step (allocator, kernel selection). Tokens processed per step = every
    # suffix (train/tokens_per_s x the step's time) + the shared prefix once (one micro-batch per step).
    steps = len(seen) - 1
    seconds = seen[-1] - seen[0]
    suffix = sum(h["train/tokens_per_s"] * (seen[i + 1] - seen[i]) for i, h in enumerate(result.history[1:]))
    tokens = suffix + steps * len(JudgeEncoder(tokenizer, args.max_length).prefix_ids)
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * tokens
    peak = peak_tflops(device, args.peak_tflops)
    moved = sum(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    out = {"train_steps": result.steps, "train_tokens_per_s": tokens / seconds,
           "train_mfu": flops / seconds / (peak * 1e12) if peak else None,
           "train_final_loss": result.final_metrics["train/loss"],
           "params_fp32": all(p.dtype == torch.float32 for p in model.parameters()),
           "params_moved": f"{moved}/{len(before)}"}
    if device.type == "cuda":
        out["train_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def judge_check(args, device: torch.device) -> dict:
    rows = pairs(args.eval_data, args.pairs, preference=False)
    texts = ([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    scores, seconds = {}, {}
    for dtype in ("bfloat16", "float32"):
        model, tokenizer = load_model(ModelConfig(source=args.source, dtype=dtype))
        judge = Judge(model.to(device).eval(), tokenizer, JudgeConfig(batch_size=args.judge_batch_size,
                                                                      max_length=1024))
        judge.preference(*(t[:args.judge_batch_size] for t in texts))  # warm-up
        sync(device)
        start = time.perf_counter()
        scores[dtype] = judge.preference(*texts).p
        sync(device)
        seconds[dtype] = time.perf_counter() - start
        del model, judge
    gap = np.abs(scores["bfloat16"] - scores["float32"])
    flips = int(np.sum((scores["bfloat16"] > 0.5) != (scores["float32"] > 0.5)))
    return {"judge_pairs": len(rows), "judge_pairs_per_s_bf16": len(rows) / seconds["bfloat16"],
            "judge_pairs_per_s_fp32": len(rows) / seconds["float32"], "bf16_vs_fp32_max_abs_dp": float(gap.max()),
            "bf16_vs_fp32_mean_abs_dp": float(gap.mean()), "bf16_vs_fp32_decision_flips": flips}


def fsdp_check(args, device: torch.device) -> dict:
    """The same stage-2 steps unsharded and under FSDP2 on this one device (full sequences: FSDP runs without
    prefix reuse); bf16 compute over fp32 master weights on a GPU, fp32 on a CPU."""
    import torch.distributed as dist

    from gram_core.encoding import encode_preference_pairs
    from gram_core.precision import autocast
    from gram_core.sharding import shard_model
    from gram_core.steps import collate_judge, judge_step_fn

    precision = "bf16" if device.type == "cuda" else "fp32"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    out: dict = {}
    try:
        for mode in ("plain", "fsdp"):
            model, tokenizer = load_model(ModelConfig(source=args.source, dtype="float32"))
            model.to(device).train()
            encoder = JudgeEncoder(tokenizer, args.max_length)
            rows = pairs(args.train_data, args.fsdp_steps * args.batch_size, preference=True)
            examples, _ = encode_preference_pairs(encoder, rows, seed=0)
            step_fn = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, reuse_prefix=False)
            collate = collate_judge(tokenizer.pad_token_id, encoder.prefix_ids)
            run = shard_model(model, step_fn, precision) if mode == "fsdp" else functools.partial(step_fn, model)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, times = [], []
            for step in range(args.fsdp_steps):
                batch = collate(examples[step * args.batch_size:(step + 1) * args.batch_size])
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                sync(device)
                start = time.perf_counter()
                with autocast(device, precision):
                    loss, _ = run(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - start)
                losses.append(float(loss.detach()))
            out[f"{mode}_losses"] = losses
            out[f"{mode}_s_per_step"] = float(np.median(times[1:] or times))
            if device.type == "cuda":
                out[f"{mode}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del model, optimizer, run
    finally:
        dist.destroy_process_group()
    gap = max(abs(a - b) for a, b in zip(out["plain_losses"], out["fsdp_losses"], strict=True))
    return {**{f"fsdp_check_{k}": v for k, v in out.items()}, "fsdp_vs_plain_max_abs_dloss": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=128, help="eval pairs for the judge checks")
    parser.add_argument("--judge-batch-size", type=int, default=32)
    parser.add_argument("--fsdp-steps", type=int, default=4, help="optimizer steps of the FSDP check")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU (auto for H100/H200)")
    parser.add_argument("--train-data", type=Path, default=DATA / "preferences_train.parquet")
    parser.add_argument("--eval-data", type=Path, default=DATA / "rewardbench_lite.parquet")
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if not args.train_data.exists():
        args.train_data = STARTER / "preferences.parquet"
    if not args.eval_data.exists():
        args.eval_data = STARTER / "eval.parquet"
    device = torch.device(args.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "source": args.source, **{k: str(v) for k, v in vars(args).items()
                                                                  if k in ("steps", "batch_size", "max_length")}}
    print(json.dumps(info))
    figures = {**info, **train_check(args, device)}
    print(json.dumps({k: v for k, v in figures.items() if k.startswith("train") or k.startswith("params")}))
    figures.update(judge_check(args, device))
    figures.update(fsdp_check(args, device))
    print(json.dumps(figures, indent=1))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1))
    failed = [] if figures["params_fp32"] else ["parameters left fp32"]
    moved, total = map(int, figures["params_moved"].split("/"))
    failed += [] if moved == total else [f"only {moved}/{total} parameters moved"]
    failed += [] if figures["bf16_vs_fp32_max_abs_dp"] < 0.05 else ["bf16 scores drift > 0.05 from fp32"]
    # Same first weights and batches: the losses differ only by rounding (bf16 compute on a GPU).
    failed += [] if figures["fsdp_vs_plain_max_abs_dloss"] < 0.05 else ["FSDP losses drift > 0.05 from unsharded"]
    if failed:
        raise SystemExit("GPU check failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
