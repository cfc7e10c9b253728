"""The settings a trained GRAM judge records (``gram_judge.json``) and the checks that read it back.

A trained GRAM judge records the settings its sequences were built with (verdict labels, max length, system
turn, a hash of the chat template). Judging it with other settings would score sequences it never saw, so
``resolve_judge_config`` adopts the recorded values where the judge config left its defaults and refuses a
value set to something else; ``check_template`` refuses a tokenizer whose chat template differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from gram_core.artifact_files import JUDGE_SETTINGS_FILE
from gram_core.config import EncodeConfig, JudgeConfig

SETTINGS_KEYS = ("label_a", "label_b", "max_length", "system_prompt")


class JudgeSettingsError(ValueError):
    """A judge config disagrees with the settings recorded in the model folder."""


def template_hash(tokenizer: Any) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()[:16]


def judge_settings(encode: EncodeConfig, tokenizer: Any) -> dict[str, Any]:
    """The settings a judge trained with ``encode`` must be read out with."""
    return {"kind": "gram_judge", "label_a": encode.label_a, "label_b": encode.label_b,
            "max_length": encode.max_length, "system_prompt": encode.system_prompt,
            "chat_template_sha256": template_hash(tokenizer)}


def write_judge_settings(folder: str | Path, settings: dict[str, Any]) -> Path:
    path = Path(folder) / JUDGE_SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=1, sort_keys=True))
    return path


def read_judge_settings(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / JUDGE_SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_judge_config(folder: str | Path, config: JudgeConfig) -> JudgeConfig:
    """``config`` with the folder's recorded judge settings; a non-default value that differs is an error."""
    settings = read_judge_settings(folder)
    if settings is None:
        return config
    defaults = JudgeConfig()
    changes, conflicts = {}, []
    for key in SETTINGS_KEYS:
        mine, recorded = getattr(config, key), settings.get(key)
        if mine == recorded:
            continue
        if mine == getattr(defaults, key):
            changes[key] = recorded
        else:
            conflicts.append(f"judge.{key}={mine!r} but the judge was trained with {recorded!r}")
    if conflicts:
        raise JudgeSettingsError(f"model folder {folder}: {'; '.join(conflicts)} (recorded in "
                                 f"{JUDGE_SETTINGS_FILE}); leave these settings at their defaults or match them")
    return dataclasses.replace(config, **changes)


def check_template(folder: str | Path, tokenizer: Any) -> None:
    settings = read_judge_settings(folder)
    if settings and settings.get("chat_template_sha256") not in (None, template_hash(tokenizer)):
        raise JudgeSettingsError(f"model folder {folder}: the tokenizer's chat template differs from the one the "
                                 "judge was trained with (chat_template_sha256 in "
                                 f"{JUDGE_SETTINGS_FILE}); use the folder's own tokenizer")
