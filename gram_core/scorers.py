"""The one way to open a scorer, and the one way to score a table of pairs with it.

``open_scorer(source, settings)`` reads a local model folder by what it holds (``folder_kind``): a GRAM judge
(with the settings it recorded, ``gram_core.judge_settings``), a plain base LM used zero-shot as a judge, or a
Bradley-Terry reward model (its scalar head in ``reward_head.safetensors``), scored as a reward model:
P(y1 ≻ y2) = σ(r1 − r2), one order. Every caller ends here: the CLI, the evaluate task, the Ray Data actors,
the MLflow pyfunc, the reward server and the RL reward functions. Turning a registry URI, a .gguf file or a
hub id into a local folder is the tasks' business (``tasks.model_source``).

The operations on an opened scorer (pairwise, rewards against a reference, group rewards, best-of-n, rank)
are ``gram_core.reward_scoring``'s; ``score_table`` here writes ``pairwise`` as a scores-contract table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from data_contracts import SCORES
from gram_core.baseline import HEAD_FILE, BTScorer
from gram_core.config import JudgeConfig, ModelConfig
from gram_core.judge_settings import JUDGE_SETTINGS_FILE, check_template, resolve_judge_config
from gram_core.judging import Judge
from gram_core.models import load_model
from gram_core.precision import default_device, inference_dtype
from gram_core.report import is_correct
from gram_core.reward_scoring import pairwise

__all__ = ["folder_kind", "is_scalar", "open_scorer", "score_table"]


def folder_kind(folder: str | Path) -> str:
    """'bradley_terry', 'gram_judge' (trained, settings recorded) or 'base' (an HF causal LM folder)."""
    folder = Path(folder)
    if (folder / HEAD_FILE).is_file():
        return "bradley_terry"
    if (folder / JUDGE_SETTINGS_FILE).is_file():
        return "gram_judge"
    if (folder / "config.json").is_file():
        return "base"
    raise FileNotFoundError(f"{folder} is neither a GRAM judge, a Bradley-Terry reward model nor a Hugging Face "
                            "model folder (no config.json)")


def open_scorer(source: str | Path, settings: JudgeConfig | None = None) -> Judge | BTScorer:
    """The scorer of the local model folder ``source``, on ``settings.device`` ('auto': the accelerator when
    present) at ``settings.dtype`` ('auto': bf16 on a GPU, fp32 on CPU), in eval mode; scoring only.

    * a GRAM judge or a base model: a ``Judge``. A trained judge is read with the settings it recorded
      (labels, max length, system turn: ``resolve_judge_config`` adopts them where ``settings`` has its
      defaults and refuses a conflicting value), and a different chat template is refused (``check_template``).
    * a Bradley-Terry folder: a ``BTScorer`` (``settings.batch_size`` and ``settings.device``; its encoding is
      the one it saved). It has no slots: ``pairwise`` reads it as σ(r1 − r2) with both "orders" equal.
    """
    settings = settings if settings is not None else JudgeConfig()
    device = default_device() if settings.device == "auto" else torch.device(settings.device)
    if folder_kind(source) == "bradley_terry":
        return BTScorer.load(source, batch_size=settings.batch_size, device=str(device))
    folder = str(source)
    settings = resolve_judge_config(folder, settings)
    model, tokenizer = load_model(ModelConfig(source=folder, dtype=inference_dtype(settings.dtype, device)),
                                  source=folder)
    check_template(folder, tokenizer)
    return Judge(model.to(device).eval(), tokenizer, settings)


def is_scalar(scorer) -> bool:
    """True for a scalar reward model (BTScorer): scored once per pair, it has no slot order, so no position
    consistency."""
    return isinstance(scorer, BTScorer)


def _columns(table: pa.Table | Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    if isinstance(table, pa.Table):
        return table.to_pydict()
    if isinstance(table, Mapping):
        return {k: list(v) for k, v in table.items()}
    raise TypeError(f"score_table: expected a pyarrow.Table or a mapping of columns, got {type(table).__name__}")


def _pick(columns: dict[str, list[Any]], names: tuple[str, ...]) -> list[Any]:
    for name in names:
        if name in columns:
            return columns[name]
    raise ValueError(f"score_table: the table needs one of the columns {list(names)} "
                     f"(rewardbench or preference_pairs contract); columns are {sorted(columns)}")


def score_table(scorer, table: pa.Table | Mapping[str, Sequence[Any]], progress=None) -> pa.Table:
    """Score (prompt, chosen, rejected) rows with ``pairwise`` -> a scores-contract table, in row order.

    Accepts the rewardbench contract (id, subset) or the preference_pairs contract (pair_id, source). A judge
    is read in both orders (its pair batching); a scalar reward model once, written as both "orders".
    """
    cols = _columns(table)
    ids = [str(v) for v in _pick(cols, ("id", "pair_id"))]
    subsets = [str(v) for v in _pick(cols, ("subset", "source"))]
    prompts, chosen, rejected = (_pick(cols, (c,)) for c in ("prompt", "chosen", "rejected"))
    scores = pairwise(scorer, prompts, chosen, rejected, progress=progress, ids=ids)
    return pa.Table.from_pydict({
        "id": ids,
        "subset": subsets,
        "p_chosen_order1": scores.p_order1,
        "p_chosen_order2": scores.p_order2,
        "p_chosen": scores.p,
        "correct": is_correct(scores.p),  # the one tie rule (gram_core.report): a tie counts as wrong
    }, schema=SCORES.schema)
