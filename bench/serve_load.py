"""Reward server load test on loopback, bounded in requests and seconds; prints one table per part.

1. Offline (in process, one judge): the same GRPO-shaped pairs (--group completions per prompt, one reference)
   scored three ways, interleaved, each keeping its fastest of --repeats rounds: naive full forward (no cache),
   template cache only (today's Judge), shared prefix (gram_core.reward_scoring); pairs/s, ratios, useful-token
   MFU against this machine's measured fp32 matmul peak, and the largest score difference.
2. Server (`gram serve MODEL` started here on a free 127.0.0.1 port, stopped by PID): one-item /get_reward
   requests (OpenRLHF's shape) at concurrency 1/4/16/64, and bulk requests; p50/p95/p99 latency, pairs/s,
   the server's batch-size histogram and queue vs compute time; the one-item latency of a direct in-process
   call beside it. Then GRPO-shaped requests (one request = one prompt's completions vs its reference) with the
   server sharing prefixes and, restarted with --no-share-prefix, without; and a 2x-overload burst.

3. ``--traffic openrlhf`` (instead of 1 and 2): what OpenRLHF sends, one sample per /get_reward request, its
   prompt rendered in the policy's ChatML and its response ending in ``<|im_end|>``, to a server started with
   ``--policy-template chatml``, at concurrency 16 and 64; beside it the offline judge scoring the same pairs
   (what the server judges after reading the template back) in process, in the same run. p50/p95/p99 latency,
   pairs/s, the ratio to offline and the largest reward difference; written to bench/results/ as JSON and
   Markdown.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.serve_load --model tiny
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.serve_load --model smollm2 --requests 16 --skip-overload
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.serve_load --model smollm2 --traffic openrlhf --requests 128 \
        --budget-s 600
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.judge_prefix import sentence  # the same filler text as the judging bench
from gram_core.config import JudgeConfig
from gram_core.judging import Judge
from gram_core.models import resolve_model_source
from gram_core.reward_scoring import ScoreStats, pairwise
from gram_core.scorers import open_scorer
from tasks.settings import load_preset

ROOT = Path(__file__).resolve().parents[1]


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng, rng.randint(8, 12)) for _ in range(rng.randint(2, 4)))


def grpo_groups(prompts: int, group: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(prompt, reference, completions): ~300-token judge sequences for SmolLM2, as in judge_prefix.py."""
    rng = random.Random(seed)
    return [(sentence(rng, rng.randint(8, 16)) + " Why?", paragraph(rng), [paragraph(rng) for _ in range(group)])
            for _ in range(prompts)]


def fp32_peak_flops(seconds: float = 1.0) -> float:
    """This machine's fp32 matmul rate (FLOP/s) with torch's current threads: the best of 1024² matmuls."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best


def offline(judge: Judge, groups, repeats: int) -> None:
    prompts = [p for p, _, cs in groups for _ in cs]
    responses = [c for _, _, cs in groups for c in cs]
    refs = [r for _, r, cs in groups for _ in cs]
    naive = Judge(judge.model, judge.tokenizer, JudgeConfig(**{**judge.config.__dict__, "reuse_prefix": False}))
    def naive_side(s: ScoreStats):  # Judge.preference without a prefix cache: every full sequence
        s.padded_tokens = 2 * sum(len(naive.encoder.full_ids(naive.encoder.encode(p, a, b)))
                                  for p, a, b in zip(prompts, responses, refs, strict=True))
        return naive.preference(prompts, responses, refs)

    sides = {"naive (no cache)": naive_side,
             "template cache (today)": lambda s: pairwise(judge, prompts, responses, refs, share=False, stats=s),
             "shared prefix": lambda s: pairwise(judge, prompts, responses, refs, share=True, stats=s)}
    best, scores, stats = {k: float("inf") for k in sides}, {}, {}
    for _ in range(repeats):
        for name, fn in sides.items():
            stats[name] = ScoreStats()
            start = time.perf_counter()
            scores[name] = fn(stats[name]).p
            best[name] = min(best[name], time.perf_counter() - start)
    params = sum(p.numel() for n, p in judge.model.named_parameters() if "embed" not in n)
    peak = fp32_peak_flops()
    template = len(judge.encoder.prefix_ids)
    useful = stats["shared prefix"].prefix_tokens + stats["shared prefix"].suffix_tokens + template * len(groups)
    n = len(responses)
    print(f"\n## Offline, GRPO-shaped: {len(groups)} prompts x {len(groups[0][2])} completions vs one reference "
          f"= {n} pairs ({2 * n} sequences, {stats['shared prefix'].naive_tokens / (2 * n) + template:.0f} tokens "
          f"each); {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'scorer':26s} {'seconds':>8s} {'pairs/s':>9s} {'vs naive':>9s} {'tokens run':>11s} {'useful MFU':>10s}")
    for name in sides:
        s = stats[name]
        ran = s.prefix_tokens + s.padded_tokens + (template if name != "naive (no cache)" else 0)
        mfu = 2 * params * useful / best[name] / peak
        print(f"{name:26s} {best[name]:8.2f} {n / best[name]:9.2f} {best['naive (no cache)'] / best[name]:8.2f}x "
              f"{ran:11d} {100 * mfu:9.1f}%")
    gap = max(float(np.abs(scores[k] - scores["naive (no cache)"]).max()) for k in sides)
    print(f"shared prefix vs template cache: {best['template cache (today)'] / best['shared prefix']:.2f}x; "
          f"max |dP| against naive {gap:.1e} (useful tokens: each distinct token once, {useful})")
    naive_ran = stats["naive (no cache)"].padded_tokens
    print(f"bound: computing each distinct token once runs {naive_ran / useful:.2f}x fewer tokens than naive, the most "
          f"any prefix sharing can give on this traffic; shared prefix reached "
          f"{best['naive (no cache)'] / best['shared prefix'] / (naive_ran / useful):.0%} of it")


# -------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict, timeout: float = 600) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")[:200]}, time.perf_counter() - start


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as answer:
        return json.loads(answer.read())


class Server:
    """`gram serve` in a process group of its own, stopped by PID."""

    def __init__(self, model: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="gb", dir="/tmp"))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(self.work / "r")}
        self.log = open(self.work / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", model, "--port", str(self.port),
                                      *extra], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("gram serve exited:\n" + (self.work / "serve.log").read_text()[-3000:])
            try:
                if get(self.url, "/ready").get("status") == "ready":
                    return
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("gram serve not ready in 600 s")

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def load(url: str, bodies: list[dict], concurrency: int, budget_s: float) -> dict:
    """Send ``bodies`` with ``concurrency`` in flight, stopping new sends after ``budget_s``."""
    deadline = time.monotonic() + budget_s

    def one(body):
        return post(url, "/get_reward", body) if time.monotonic() < deadline else None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    results = [r for r in answers if r is not None]
    ok = [r for r in results if r[0] == 200]
    lat = np.array([r[2] for r in ok]) * 1000 if ok else np.array([float("nan")])
    pairs = sum(len(r[1]["rewards"]) for r in ok)
    return {"sent": len(results), "ok": len(ok), "rejected": sum(r[0] in (429, 503) for r in results),
            "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99),
            "pairs_s": pairs / wall, "reject_ms": max((r[2] * 1000 for r in results if r[0] != 200), default=0.0),
            "answers": [r[1] if r is not None and r[0] == 200 else None for r in answers]}  # per body, in order


def row(name: str, r: dict) -> str:
    return (f"{name:30s} {r['sent']:5d} {r['ok']:5d} {r['rejected']:5d} {r['p50']:8.0f} {r['p95']:8.0f} "
            f"{r['p99']:8.0f} {r['pairs_s']:9.2f}")


HEADER = f"{'traffic':30s} {'sent':>5s} {'ok':>5s} {'503':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'pairs/s':>9s}"


def bodies_for(groups, per_request: int) -> list[dict]:
    """OpenRLHF-shaped bodies of ``per_request`` items each (query = prompt + response, label = reference)."""
    items = [(p, c, r) for p, r, cs in groups for c in cs]
    return [{"query": [p + c for p, c, _ in chunk], "prompts": [p for p, _, _ in chunk],
             "labels": [r for _, _, r in chunk]}
            for chunk in (items[i:i + per_request] for i in range(0, len(items), per_request))]


def served(args, judge, groups) -> None:
    server = Server(args.model, ["--cpus-per-replica", str(args.threads), "--max-queue", str(args.max_queue)])
    try:
        singles = bodies_for(groups, 1)
        post(server.url, "/get_reward", singles[0])  # warm-up
        direct = []
        for body in singles[:min(16, len(singles))]:
            start = time.perf_counter()
            pairwise(judge, body["prompts"], [body["query"][0][len(body["prompts"][0]):]], body["labels"], share=True)
            direct.append(time.perf_counter() - start)
        print(f"\n## Server {server.url} ({args.model}, 1 replica, {args.threads} CPU threads)")
        print(HEADER)
        for c in args.concurrency:
            print(row(f"one-item, concurrency {c}", load(server.url, singles[:max(args.requests, 2 * c)], c,
                                                          args.budget_s)), flush=True)
        bulk = bodies_for(grpo_groups(args.bulk // args.group + 1, args.group, args.seed + 1), args.bulk)[:1] * 3
        print(row(f"bulk {args.bulk}-item, concurrency 1", load(server.url, bulk, 1, args.budget_s)), flush=True)
        print(f"direct in-process one-item call: p50 {1000 * np.median(direct):.0f} ms "
              f"(server one-item at concurrency 1: see p50 above)")
        stats = get(server.url, "/v1/stats")
        print(f"server batches {stats['batches']}, rows per batch (power-of-two buckets) {stats['rows_histogram']}, "
              f"queue {stats['queue_s']:.1f} s vs compute {stats['compute_s']:.1f} s (summed over requests)")
        grpo = bodies_for(groups, args.group)
        shared = load(server.url, grpo, 1, args.budget_s)
        if not args.skip_overload:
            burst = bodies_for(grpo_groups(args.max_queue // 2 // args.group * 2 + 2, args.group, args.seed + 2),
                               args.max_queue // 4)  # 2x the queue bound at once
            over = load(server.url, burst, len(burst), args.budget_s)
            after = load(server.url, grpo[:2], 1, args.budget_s)
            print(row("overload burst (2x queue)", over) + f"   slowest rejection {over['reject_ms']:.0f} ms")
            print(row("after the burst", after))
    finally:
        server.stop()
    server = Server(args.model, ["--cpus-per-replica", str(args.threads), "--no-share-prefix"])
    try:
        post(server.url, "/get_reward", grpo[0])
        unshared = load(server.url, grpo, 1, args.budget_s)
    finally:
        server.stop()
    print(f"\n## Server, GRPO-shaped requests ({args.group} completions of one prompt vs one reference each)")
    print(HEADER)
    print(row("shared prefix", shared))
    print(row("template cache only", unshared))
    print(f"pairs/s shared / template only: {shared['pairs_s'] / unshared['pairs_s']:.2f}x")


CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def openrlhf_bodies(groups) -> list[dict]:
    """One sample per request, as OpenRLHF sends it: the prompt in the policy's ChatML (system + user turn +
    generation header), query = prompt + response + <|im_end|>, label = the plain reference."""
    bodies = []
    for question, reference, completions in groups:
        prompt = f"{CHATML_SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        bodies += [{"query": [prompt + c + "<|im_end|>"], "prompts": [prompt], "labels": [reference]}
                   for c in completions]
    return bodies


def openrlhf_traffic(args, judge, groups) -> dict:
    """OpenRLHF-shaped load at each concurrency beside the offline judge on the same pairs; prints the table and
    returns the figures."""
    from tasks.serving.api import ServeLimits, openrlhf_job

    levels = args.concurrency or [16, 64]
    bodies = openrlhf_bodies(groups)[:max(args.requests, 2 * max(levels))]
    limits = ServeLimits(policy_template="chatml")
    pairs = [openrlhf_job(body, limits).pairs[0] for body in bodies]  # what the server judges: the plain texts
    judge.encoder.literal = True  # request texts, read as the server reads them
    prompts, responses, refs = (list(column) for column in zip(*pairs, strict=True))
    offline_s = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        offline_p = pairwise(judge, prompts, responses, refs).p
        offline_s = min(offline_s, time.perf_counter() - start)
    offline = {"pairs": len(pairs), "seconds": offline_s, "pairs_s": len(pairs) / offline_s}
    server = Server(args.model, ["--cpus-per-replica", str(args.threads), "--max-queue", str(args.max_queue),
                                 "--policy-template", "chatml"])
    levels_out = []
    try:
        post(server.url, "/get_reward", bodies[0])  # warm-up
        for c in levels:
            sent = bodies[:max(args.requests, 2 * c)]
            r = load(server.url, sent, c, args.budget_s)
            gaps = [abs(a["rewards"][0] - float(offline_p[i])) for i, a in enumerate(r.pop("answers")) if a]
            levels_out.append({"concurrency": c, **{k: float(v) for k, v in r.items()},
                               "vs_offline": r["pairs_s"] / offline["pairs_s"],
                               "max_abs_reward_diff": max(gaps, default=float("nan"))})
        stats = get(server.url, "/v1/stats")
    finally:
        server.stop()
    title = (f"## OpenRLHF traffic: one chat-templated (ChatML) sample per /get_reward request, "
             f"gram serve {args.model} --policy-template chatml, 1 replica, {args.threads} CPU threads; "
             f"offline: the same pairs in process")
    header = (f"{'':30s} {'sent':>5s} {'ok':>5s} {'503':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
              f"{'pairs/s':>9s} {'vs offline':>10s}")
    lines = [title, header, f"{'offline judge (same pairs)':30s} {len(pairs):5d} {'':5s} {'':5s} {'':8s} {'':8s} "
             f"{'':8s} {offline['pairs_s']:9.2f} {1:9.2f}x"]
    lines += [row(f"server, concurrency {r['concurrency']}", {**r, "sent": int(r["sent"]), "ok": int(r["ok"]),
                                                               "rejected": int(r["rejected"])})
              + f" {r['vs_offline']:9.2f}x" for r in levels_out]
    lines.append("max |server reward - offline P| per level: " + ", ".join(
        f"c={r['concurrency']}: {r['max_abs_reward_diff']:.1e}" for r in levels_out))
    lines.append(f"server batches {stats['batches']}, rows per batch (power-of-two buckets) {stats['rows_histogram']}")
    print("\n" + "\n".join(lines), flush=True)
    return {"offline": offline, "server": levels_out, "table": lines}


def write_results(args, result: dict, load_average: float) -> Path:
    """bench/results/serve_openrlhf_<model>.json and .md: the figures, the command, the machine, the date."""
    out = Path(args.out or ROOT / "bench" / "results" / f"serve_openrlhf_{Path(args.model).name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.serve_load " + " ".join(sys.argv[1:])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
            "threads": args.threads, "cpus": os.cpu_count(), "load_average_at_start": load_average,
            "wall_s": round(time.monotonic() - args.t0, 1)}
    table = result.pop("table")
    out.with_suffix(".json").write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"    {command}\n\n{meta['date']}, {meta['cpus']} CPUs, load average {load_average:.1f} at the start, "
        f"{meta['wall_s']:.0f} s in all\n\n```text\n" + "\n".join(table) + "\n```\n")
    print(f"results: {out.with_suffix('.md')} and .json")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="MODEL as for gram serve (tiny, smollm2, a folder)")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts (each --group completions)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--bulk", type=int, default=256)
    parser.add_argument("--requests", type=int, default=64, help="one-item requests per concurrency level (at least 2c)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="one-item concurrency levels (default 1,4,16,64; with --traffic openrlhf 16,64)")
    parser.add_argument("--traffic", choices=("mixed", "openrlhf"), default="mixed",
                        help="mixed: parts 1 and 2 (offline scorers, server traffic mix); openrlhf: part 3")
    parser.add_argument("--out", help="--traffic openrlhf: results path without suffix "
                        "(default bench/results/serve_openrlhf_<model>)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop sending after this long, per phase")
    parser.add_argument("--max-queue", type=int, default=1024, help="the server's queue bound (sequences)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-overload", action="store_true")
    args = parser.parse_args()
    args.t0, load_average = time.monotonic(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    if args.traffic == "openrlhf":  # the offline side judges as `gram serve` does: its default preset's config
        judge = open_scorer(resolve_model_source(args.model), load_preset("demo").resolved().judge)
        wanted = max(args.requests, 2 * max(args.concurrency or [64]))
        groups = grpo_groups((wanted + args.group - 1) // args.group, args.group, args.seed)
        write_results(args, openrlhf_traffic(args, judge, groups), load_average)
        return
    args.concurrency = args.concurrency or [1, 4, 16, 64]
    judge = open_scorer(resolve_model_source(args.model), JudgeConfig(dtype="float32"))
    groups = grpo_groups(max(args.prompts, (args.requests + args.group - 1) // args.group), args.group, args.seed)
    offline(judge, groups[:args.prompts], args.repeats)
    if not args.skip_server:
        served(args, judge, groups)


if __name__ == "__main__":
    main()
