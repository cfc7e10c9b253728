"""What a model folder is, and the scorer that reads it: a GRAM judge, a Bradley-Terry reward model, or a
plain base LM used zero-shot as a judge.

A GRAM judge is read with the settings it recorded (``gram_core.judge_settings``). A Bradley-Terry folder
carries its scalar head (``reward_head.safetensors``) and is scored as a reward model:
P(y1 ≻ y2) = σ(r1 − r2), one order.
"""

from __future__ import annotations

from pathlib import Path

from gram_core.baseline import HEAD_FILE, BTScorer
from gram_core.config import JudgeConfig
from gram_core.judge_settings import JUDGE_SETTINGS_FILE
from gram_core.judging import default_device, load_judge, score_pairs


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


def load_scorer(folder: str | Path, config: JudgeConfig):
    """A Judge (GRAM judge or base model zero-shot; ``judging.load_judge``: recorded settings, device, dtype)
    or a BTScorer for ``folder``, by what the folder holds."""
    if folder_kind(folder) == "bradley_terry":
        device = default_device() if config.device == "auto" else config.device
        return BTScorer.load(folder, batch_size=config.batch_size, device=str(device))
    return load_judge(str(folder), config)


def is_scalar(scorer) -> bool:
    """True for a scalar reward model (BTScorer): scored once per pair, it has no slot order, so no position
    consistency."""
    return isinstance(scorer, BTScorer)


def score_table(scorer, table, progress=None):
    """A scores-contract table of ``table``'s pairs from either kind of scorer."""
    if is_scalar(scorer):
        return scorer.score_pairs(table)
    return score_pairs(scorer, table, progress=progress)
