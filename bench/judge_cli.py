"""`gram judge` on a registered model: the first call (download, hash, cache) vs later calls (cache hit).

Registers a model folder (default: the packaged SmolLM2-135M-Instruct, 517 MB, as the demo run would) as
version 1 of `gram-reward-model` in a temporary state folder, then times `gram judge --model
models:/gram-reward-model@champion` as a user runs it (a fresh process each time): once with an empty model
cache, then --repeats times with the cache filled. Prints each wall time and the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.judge_cli [--source smollm2|tiny|FOLDER] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register(source: str, home: Path) -> None:
    from gram_core.models import resolve_model_source
    from tasks.on_mlflow import model_registry, tracking
    from tasks.settings import MlflowConfig
    from tasks.store.artifacts import folder_sha256

    folder = resolve_model_source(source)
    cfg = MlflowConfig()
    with tracking.start_pipeline_run(cfg, home, "bench"), tracking.stage_run("register"):
        model_registry.log_and_register(folder, cfg, {cfg.promotion_metric: 0.5}, {"model_sha256": folder_sha256(folder)},
                                  "bench")


def judge_seconds(home: Path) -> float:
    env = {**os.environ, "GRAM_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "judge", "--model", "models:/gram-reward-model@champion",
                    "--prompt", "What is 2+2?", "--a", "4", "--b", "5"], env=env, check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2", help="model to register: smollm2, tiny or a HF folder")
    parser.add_argument("--repeats", type=int, default=3, help="cached calls to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gram-bench-") as tmp:
        home = Path(tmp)
        register(args.source, home)
        cold = judge_seconds(home)
        cached = min(judge_seconds(home) for _ in range(args.repeats))
    print(f"gram judge, first call (download + verify + cache): {cold:6.1f} s")
    print(f"gram judge, cached (best of {args.repeats}):              {cached:6.1f} s")
    print(f"first / cached: {cold / cached:.2f}x")


if __name__ == "__main__":
    main()
