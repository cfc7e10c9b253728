"""The ``gram`` command line: every subcommand's arguments and their defaults (``flows.cli`` runs them)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gram", description="Train and use GRAM generative reward models "
                                     "(pairwise A/B judges).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="demo", help="preset name (smoke, demo, paper) or a YAML path")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config field, e.g. --set finetune.learning_rate=1e-4 (repeatable)")

    def drop_arg(p: argparse.ArgumentParser, which: str) -> None:
        p.add_argument("--drop-invalid-rows", action="store_true",
                       help=f"drop (and log) the rows of {which} that break a row-level rule of the data contract "
                       "(blank text, chosen == rejected, text that is not valid Unicode, ...) instead of stopping; "
                       "a missing or mistyped column still stops, and so does a file with more than "
                       "max_dropped_share (default 5 %%) of such rows")

    run = sub.add_parser("run", help="run the whole pipeline and print a summary")
    config_args(run)
    run.add_argument("--refresh", action="store_true", help="recompute every stage (ignore cached results)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    drop_arg(run, "every data source of the preset (data.prompts, response_pools, unlabeled_pairs, preferences, "
             "eval)")

    adapt = sub.add_parser("adapt", help="fine-tune a registered judge on a small labeled set, evaluate, register")
    config_args(adapt)
    adapt.add_argument("--model", default="models:/gram-reward-model@champion", help="registered judge to start from")
    adapt.add_argument("--data", required=True, help="labeled pairs (prompt, chosen, rejected): file or folder")
    adapt.add_argument("--refresh", action="store_true")
    adapt.add_argument("--json", action="store_true")
    drop_arg(adapt, "--data and of the eval set (data.eval)")

    judge = sub.add_parser("judge", help="P(a ≻ b) for one pair, from both slot orders")
    config_args(judge)
    judge.add_argument("--model", required=True)
    judge.add_argument("--prompt", required=True)
    judge.add_argument("--a", required=True, help="response a")
    judge.add_argument("--b", required=True, help="response b")

    rank = sub.add_parser("rank", help="best-of-n over a JSONL of {prompt, candidates: [...]} lines")
    config_args(rank)
    rank.add_argument("--model", required=True)
    rank.add_argument("--input", required=True, help="JSONL file; each line {\"prompt\": ..., \"candidates\": [...]}")

    evaluate = sub.add_parser("eval", help="evaluate a judge on a RewardBench-format file")
    config_args(evaluate)
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="RewardBench-format Parquet/JSONL/JSON/CSV file or folder")
    evaluate.add_argument("--limit", type=int, default=0, help="score a seeded, subset-stratified sample of N pairs")
    evaluate.add_argument("--output", help="also write the per-pair scores here (Parquet)")
    evaluate.add_argument("--actors", type=int, default=None,
                          help="fan the judging out over N Ray Data actors (default: eval.actors of the preset)")
    drop_arg(evaluate, "--data (max_dropped_share: data.eval.max_dropped_share)")

    study = sub.add_parser("study", help="the quality study: zero-shot | BT | judge without stage 1 | GRAM (eps 0.1) "
                           "| GRAM (eps 0) on one eval set (study.arms picks them; default data: ../shared/data)")
    config_args(study)
    study.set_defaults(preset="study")
    study.add_argument("--refresh", action="store_true", help="recompute every stage (ignore cached results)")
    study.add_argument("--out", help="also write the report (with this command and its wall time) to this "
                       "Markdown file, and the chart beside it as <name>.png")
    drop_arg(study, "every data source of the preset (data.prompts, response_pools, unlabeled_pairs, preferences, "
             "eval)")

    serve = sub.add_parser("serve", help="a batched reward server (Ray Serve): OpenRLHF /get_reward, pairwise, "
                           "GRPO group rewards, best-of-n; see docs/serving.md")
    config_args(serve)
    serve.add_argument("model", help="MODEL as for `gram judge` (registry URI, folder, .gguf, smollm2, tiny)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="listen address (default loopback only; any other needs --token-file or --insecure)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without --token-file (a network you trust)")
    serve.add_argument("--policy-template", default="auto",
                       choices=("auto", "chatml", "qwen", "llama3", "gemma", "none"),
                       help="/get_reward: the RL policy's chat template, stripped from prompts and responses "
                       "so the judge sees plain text (auto: detected per prompt; none: texts as sent)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="judge replicas (each loads the model)")
    serve.add_argument("--max-replicas", type=int, default=None,
                       help="Ray Serve autoscaling from --replicas up to this many (on a cluster: RAY_ADDRESS)")
    serve.add_argument("--cpus-per-replica", type=float, default=None,
                       help="CPUs (= torch threads) per replica (default: the machine's CPUs / replicas)")
    serve.add_argument("--token-file", help="require 'Authorization: Bearer <token>' with the token in this file")
    serve.add_argument("--reward", choices=("probability", "logit"), default="probability",
                       help="/get_reward 'rewards': P(response ≻ reference) or its logit ('scores' is always P)")
    serve.add_argument("--max-batch", type=int, default=512,
                       help="judge sequences (2 per pair) gathered from concurrent requests into one batch (a "
                       "bigger request is scored in batches of this size)")
    serve.add_argument("--max-rows", type=int, default=None,
                       help="judge sequences one request may carry, 413 beyond (default: --max-batch); raise it to "
                       "2 x the rollout batch for OpenRLHF < 0.9.1, which posts a whole rollout batch at once")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    serve.add_argument("--forward-rows", type=int, default=32, help="sequences per forward pass")
    serve.add_argument("--forward-tokens", type=int, default=32768, help="padded tokens per forward pass")
    serve.add_argument("--max-queue", type=int, default=4096,
                       help="sequences pending per replica; beyond it requests get 503 with Retry-After at once")
    serve.add_argument("--max-group", type=int, default=16,
                       help="completions per GRPO group (a group costs n(n-1)/2 pairs)")
    serve.add_argument("--max-request-tokens", type=int, default=2**18, help="tokens per request (413 beyond)")
    serve.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                       help="cache only the judge template, not each prompt's/reference's prefix (for comparison)")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="request body size cap (413 beyond)")

    presets = sub.add_parser("presets", help="list the presets and every config field with its help")
    presets.add_argument("--fields", action="store_true", help="also list every config field")

    gc = sub.add_parser("gc", help="list (or with --apply, remove) artifacts no cached stage uses, leftovers of "
                        "killed runs and old Ray checkpoints in the state folder")
    config_args(gc)
    gc.add_argument("--apply", action="store_true", help="remove them (default: dry run, only print)")
    gc.add_argument("--keep-ray-runs-days", type=float, default=7.0,
                    help="remove interrupted Ray runs older than this many days (default 7)")
    for command in sub.choices.values():  # `gram judge ... --debug` as well as `gram --debug judge ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser
