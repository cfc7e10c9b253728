"""Every file name an artifact or model folder holds, in one place: the writers and the readers import them.

The artifact store (``tasks.store.artifacts``): each stage's folder ``<store>/<stage>/<hash>/``. Model folders: what a
training stage, a checkpoint and a Ray Train final checkpoint hold besides the Hugging Face files. (The
Bradley-Terry head's two names, ``reward_head.safetensors`` and ``reward_head.json``, are still defined by
``gram_core.baseline``, which writes and reads them.)
"""

from __future__ import annotations

# The artifact store: every artifact.
MANIFEST = "_artifact.json"  # written last; a folder without it is not a (complete) artifact
# Table artifacts (sources, pairs, scores).
TABLE_FILE = "table.parquet"
POOL_FILE = "pool.parquet"  # build_pairs: the response pool the pairs were drawn from, beside the pairs
# Model artifacts.
TRAIN_HISTORY_FILE = "metrics.jsonl"  # a model's per-step training metrics, one JSON line a step
# Its per-step wall-clock figures (tokens/s): beside the history, outside the content hash, so that the same
# training on the same machine gives the same artifact hash (and `gram run --refresh` the same model version).
TIMINGS_FILE = "timings.jsonl"
UNHASHED = frozenset({MANIFEST, TIMINGS_FILE})
# The eval report (eval_report): the Markdown links the chart by this name.
REPORT_FILE = "report.md"
CHART_FILE = "chart.png"
EVAL_METRICS_FILE = "metrics.json"
# The quality study's report (study_report).
STUDY_FILE = "quality.md"
STUDY_CHART = "quality.png"
STUDY_METRICS = "metrics.json"

# A trained judge's folder: the settings its sequences were built with (gram_core.judge_settings).
JUDGE_SETTINGS_FILE = "gram_judge.json"
# A resumable training checkpoint (gram_core.checkpoints).
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
# A Ray Train final checkpoint (tasks.on_ray.worker): the trained HF folder, the history, the marker written last.
MODEL_DIR = "model"
FINAL_FILE = "final.json"  # {"stage", "steps"}
