"""The ``gram`` command: run the pipeline, adapt a registered judge, and use any judge from the shell.

    gram run [--preset demo] [--set key.path=value ...] [--refresh] [--drop-invalid-rows]
    gram adapt --data labeled.jsonl [--model models:/gram-reward-model@champion] [--preset demo] [--drop-invalid-rows]
    gram judge --model MODEL --prompt TEXT --a TEXT --b TEXT
    gram rank  --model MODEL --input candidates.jsonl
    gram eval  --model MODEL --data rewardbench.parquet [--drop-invalid-rows]
    gram serve MODEL [--host 127.0.0.1] [--port 8000] [--replicas 1] [--token-file F] [--reward probability|logit]
               [--policy-template auto|chatml|qwen|llama3|gemma|none] [--max-rows N] [--insecure]
    gram study [--preset study] [--set key.path=value ...] [--out docs/quality.md] [--drop-invalid-rows]
    gram presets [--fields]
    gram gc [--apply] [--preset demo]      # unreferenced artifacts, old Ray checkpoints (dry run by default)

MODEL is a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION), a local Hugging Face folder (a GRAM
judge, a base LM used zero-shot, or a Bradley-Terry reward model, scored as a scalar reward model), a .gguf
file, 'smollm2' (the packaged default) or 'tiny'. Heavy libraries load only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.cli_args import build_parser
from flows.cli_text import dropped_lines, format_summary, read_candidates  # noqa: F401  (read_candidates: tests)

# Ray's token auth stays on (its default): a local runtime listens on the host's address, not only loopback.
OFFLINE_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # 20 s is too short on a busy 2-core box
                    "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _preflight(config: Any) -> Iterator[None]:
    """Fail before the Prefect API starts (10-20 s) when another run holds the state folder or the tracking
    server is unreachable; hold the folder for the whole command (the flow re-enters the lock)."""
    from tasks.on_mlflow.tracking import check_tracking_server, resolve_tracking_uri
    from tasks.store.state import hold_state_folder

    with hold_state_folder(config):
        check_tracking_server(resolve_tracking_uri(config.mlflow, config.home))
        yield


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    with _preflight(_config(args)):
        from flows.parameters import private_overrides
        from flows.pipeline import gram_pipeline

        with private_overrides(args.overrides) as overrides:
            summary = gram_pipeline(preset=args.preset, overrides=overrides or None, refresh=args.refresh,
                                    drop_invalid_rows=args.drop_invalid_rows)
    print(json.dumps(summary, indent=1, default=str) if args.json else format_summary(summary))
    return summary


def cmd_study(args: argparse.Namespace) -> dict[str, Any]:
    import shlex
    import shutil
    import time

    began = time.time()
    with _preflight(_config(args)):
        from flows.parameters import private_overrides
        from flows.study import gram_study

        with private_overrides(args.overrides) as overrides:
            summary = gram_study(preset=args.preset, overrides=overrides or None, refresh=args.refresh,
                                 drop_invalid_rows=args.drop_invalid_rows)
    minutes = (time.time() - began) / 60
    report = Path(summary["report"]).read_text()
    print(report)
    for line in dropped_lines(summary.get("dropped_rows"))[1:]:  # the rows drop_invalid_rows left out, per source
        print(line)
    print(f"Study: {minutes:.1f} min; report {summary['report']}; MLflow run {summary['mlflow_run']} at "
          f"{summary['tracking_uri']}")
    if args.out:
        out = Path(args.out)
        from tasks.redaction import redact

        command = redact("gram " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"]
                         else f"gram study --preset {args.preset}")  # a --set value may hold a credential
        chart = out.with_suffix(".png")
        shutil.copy(summary["chart"], chart)
        out.write_text(f"# Quality study ({args.preset})\n\nCommand: `{command}` — wall time {minutes:.1f} min "
                       f"(stages served from cache count as ~0).\n\n![study]({chart.name})\n\n{report}")
        print(f"wrote {out} and {chart}")
    return summary


def cmd_adapt(args: argparse.Namespace) -> dict[str, Any]:
    from flows.adapt import adapt_config

    config = adapt_config(args.preset, args.overrides or None, args.data, args.drop_invalid_rows)
    if args.model.startswith("models:/"):  # a missing model or alias fails here, before Prefect starts
        from tasks.on_mlflow.model_registry import find_version
        from tasks.on_mlflow.tracking import resolve_tracking_uri

        find_version(args.model, resolve_tracking_uri(config.mlflow, config.home))
    with _preflight(config):
        from flows.adapt import adapt
        from flows.parameters import private_overrides, private_values

        with private_overrides(args.overrides) as overrides, private_values(args.model, args.data) as (model, data):
            summary = adapt(model=model, data=data, preset=args.preset, overrides=overrides or None,
                            refresh=args.refresh, drop_invalid_rows=args.drop_invalid_rows)
    print(json.dumps(summary, indent=1, default=str) if args.json else format_summary(summary))
    return summary


def cmd_gc(args: argparse.Namespace) -> list[Any]:
    from tasks.store.state import collect_garbage

    garbage = collect_garbage(_config(args), apply=args.apply, keep_ray_runs_days=args.keep_ray_runs_days)
    for item in garbage:
        print(f"{item.bytes / 2**20:10.1f} MiB  {item.path}  ({item.why})")
    total = sum(g.bytes for g in garbage if not g.why.startswith("KEPT"))
    verb = "freed" if args.apply else "would free (dry run; --apply removes)"
    print(f"{len(garbage)} item(s); {verb} {total / 2**20:.1f} MiB")
    return garbage


def _config(args: argparse.Namespace):
    from tasks.settings import load_preset

    return load_preset(args.preset, args.overrides or None).resolved()


def _load_scorer(args: argparse.Namespace):
    """The scorer for --model (``tasks.model_source.open_model``: a Judge on judge.device at judge.dtype with its
    recorded judge settings, or a BTScorer for a Bradley-Terry folder); anything else is a ModelSourceError (one
    line)."""
    from gram_core.models import ModelSourceError
    from tasks.model_source import open_model

    try:
        return open_model(args.model, _config(args))
    except (ModelSourceError, FileNotFoundError) as err:
        raise ModelSourceError(f"--model {args.model}: {err}") from err


def cmd_judge(args: argparse.Namespace) -> dict[str, float]:
    from gram_core.report import orders_agree
    from gram_core.reward_scoring import pairwise
    from gram_core.scorers import is_scalar

    judge = _load_scorer(args)
    scores = pairwise(judge, [args.prompt], [args.a], [args.b])
    out = {"p_a_better": float(scores.p[0]), "p_order1": float(scores.p_order1[0]),
           "p_order2": float(scores.p_order2[0]),
           "consistent": bool(orders_agree(scores.p_order1[0], scores.p_order2[0]))}
    if is_scalar(judge):  # one reward per response: no slots, so no second order to agree with
        out["consistent"] = None
        print(f"P(a ≻ b) = {out['p_a_better']:.4f}  (scalar reward model: σ(r_a − r_b), no slot order)")
        return out
    print(f"P(a ≻ b) = {out['p_a_better']:.4f}  (a in slot A: {out['p_order1']:.4f}, a in slot B: "
          f"{out['p_order2']:.4f}; orders {'agree' if out['consistent'] else 'disagree'})")
    return out


def cmd_rank(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gram_core.reward_scoring import best_of_n

    rows = read_candidates(args.input)
    judge = _load_scorer(args)
    results = []
    for row in rows:
        winner, comparisons = best_of_n(judge, row["prompt"], row["candidates"])
        result = {"line": row["line"], "best_index": winner, "best": row["candidates"][winner],
                  "comparisons": comparisons}
        print(json.dumps(result, ensure_ascii=False))
        results.append(result)
    return results


def cmd_eval(args: argparse.Namespace) -> dict[str, float]:
    from data_contracts import REWARDBENCH, DroppedRow, read_table, write_table
    from flows.errors import InputError
    from gram_core.comparison_report import comparison_markdown, eval_metrics
    from gram_core.sources import dropped_summary, limit_rows
    from tasks.evaluate import score_model
    from tasks.model_source import resolve_model

    config = _config(args)
    policy = config.data.eval  # --data takes data.eval's place, with its row policy
    dropped: list[DroppedRow] = []
    table = read_table(args.data, REWARDBENCH, drop_invalid=args.drop_invalid_rows or policy.drop_invalid_rows,
                       max_dropped_share=policy.max_dropped_share, dropped=dropped)
    read = table.num_rows + len(dropped)
    drops = dropped_summary(dropped) if args.drop_invalid_rows or policy.drop_invalid_rows else None
    table = limit_rows(table, args.limit, 0, stratify="subset")
    actors = config.eval.actors if args.actors is None else args.actors
    try:
        scores, scalar_model = score_model(resolve_model(args.model, config), table, config.judge, actors, config.ray,
                                           progress=True)
    except FileNotFoundError as err:
        raise InputError(f"--model {args.model}: {err}") from err
    if args.output:
        write_table(scores, args.output, "scores")
    scalar = [args.model] if scalar_model else []
    print(comparison_markdown({args.model: scores}, scalar=scalar, eval_name=args.data, dropped=drops,
                              rows_read=read, chart=None))
    return eval_metrics(scores, bool(scalar))


def cmd_serve(args: argparse.Namespace) -> None:
    from flows.errors import InputError
    from tasks.model_source import resolve_model
    from tasks.serving.api import ServeLimits, exposure_error
    from tasks.serving.server import serve_forever

    config = _config(args)
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_rows=args.max_batch,
                         max_request_rows=args.max_rows, max_request_tokens=args.max_request_tokens,
                         max_group=args.max_group, max_queue_rows=args.max_queue, reward=args.reward,
                         policy_template=args.policy_template)
    exposed = exposure_error(args.host, bool(args.token_file), args.insecure)
    if exposed:
        raise InputError(exposed)
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise InputError(f"--token-file {args.token_file} is empty")
    folder = resolve_model(args.model, config)
    serve_forever(folder, config.judge, limits, host=args.host, port=args.port, replicas=args.replicas,
                  max_replicas=args.max_replicas, token=token, batch_wait_ms=args.batch_wait_ms,
                  forward_rows=args.forward_rows, forward_tokens=args.forward_tokens,
                  cpus_per_replica=args.cpus_per_replica, share_prefix=args.share_prefix,
                  say=lambda line: print(line, flush=True))
    # Stopped, drained and flushed: leave now. Interpreter finalization after ray.shutdown() took another
    # 2.6-5.5 s (Ray's core worker), past the 10 s a SIGTERM promises, with daemon threads frozen meanwhile.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_presets(args: argparse.Namespace) -> None:
    from gram_core.config import describe
    from tasks.settings import PRESETS_DIR, PipelineConfig, preset_names

    for name in preset_names():
        first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:8s} {first}")
    if args.fields:
        print("\nConfig fields (set any with --set key.path=value):")
        for key, default, text in describe(PipelineConfig):
            print(f"  {key} = {default}\n      {text}")


COMMANDS = {"run": cmd_run, "adapt": cmd_adapt, "judge": cmd_judge, "rank": cmd_rank, "eval": cmd_eval,
            "study": cmd_study, "presets": cmd_presets, "gc": cmd_gc, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from tasks.redaction import console_redacted, install_log_redaction, remember, remember_environment

    remember(*(sys.argv[1:] if argv is None else argv))
    remember_environment()  # $MLFLOW_TRACKING_URI, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...
    install_log_redaction()
    with console_redacted():  # what we and the libraries print, as the log records: credentials hidden
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from flows.errors import error_line, is_expected, quiet_prefect_tracebacks

    debug = getattr(args, "debug", False)
    from tasks.on_mlflow.promotion_gate import PromotionConflict
    from tasks.on_mlflow.tracking import TrackingServerUnreachable
    from tasks.store.locks import LockHeldError

    try:
        if args.command in ("run", "adapt", "study") and not debug:
            _config(args)  # fail on a bad config before Prefect starts; quiet Prefect only once it is imported
            quiet_prefect_tracebacks()
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"gram {args.command}: interrupted", file=sys.stderr)
        return 130
    # another run, the server, or a rival promotion gate: try again later
    except (LockHeldError, TrackingServerUnreachable, PromotionConflict) as err:
        if debug:
            raise
        print(f"gram {args.command}: {err}", file=sys.stderr)
        return 3
    except Exception as err:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        if debug:
            raise
        print(error_line(args.command, err), file=sys.stderr)
        return 2 if is_expected(err) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
