"""What a model folder is and how it is read: recorded judge settings, their round trip and mismatches."""

import json

import pytest

from gram_core.config import EncodeConfig, JudgeConfig
from gram_core.judge_settings import (
    JUDGE_SETTINGS_FILE,
    JudgeSettingsError,
    judge_settings,
    read_judge_settings,
    resolve_judge_config,
    write_judge_settings,
)
from gram_core.scorers import folder_kind, open_scorer


@pytest.fixture()
def judge_folder(tmp_path, tiny_model, tiny_tokenizer):
    from gram_core.models import save_model

    folder = save_model(tiny_model, tiny_tokenizer, tmp_path / "judge")
    encode = EncodeConfig(max_length=384, label_a="A", label_b="B", system_prompt="Judge fairly.")
    write_judge_settings(folder, judge_settings(encode, tiny_tokenizer))
    return folder


def test_settings_round_trip_and_are_adopted(judge_folder):
    settings = read_judge_settings(judge_folder)
    assert settings["max_length"] == 384 and settings["system_prompt"] == "Judge fairly."
    assert folder_kind(judge_folder) == "gram_judge"
    resolved = resolve_judge_config(judge_folder, JudgeConfig(batch_size=3))
    assert (resolved.max_length, resolved.system_prompt, resolved.batch_size) == (384, "Judge fairly.", 3)
    judge = open_scorer(judge_folder, JudgeConfig())
    assert judge.encoder.max_length == 384
    text = judge.tokenizer.decode(judge.encoder.prefix_ids)
    assert text.startswith("<|im_start|>system\nJudge fairly.<|im_end|>")


def test_a_mismatching_setting_is_refused(judge_folder):
    with pytest.raises(JudgeSettingsError, match=r"judge.max_length=512 but the judge was trained with 384"):
        resolve_judge_config(judge_folder, JudgeConfig(max_length=512))
    with pytest.raises(JudgeSettingsError, match=r"judge.label_a='X'"):
        open_scorer(judge_folder, JudgeConfig(label_a="X", label_b="Y"))


def test_a_changed_chat_template_is_refused(judge_folder):
    settings = json.loads((judge_folder / JUDGE_SETTINGS_FILE).read_text())
    settings["chat_template_sha256"] = "0" * 16
    (judge_folder / JUDGE_SETTINGS_FILE).write_text(json.dumps(settings))
    with pytest.raises(JudgeSettingsError, match="chat template differs"):
        open_scorer(judge_folder, JudgeConfig())


def test_folder_kinds(tmp_path, judge_folder):
    (judge_folder / JUDGE_SETTINGS_FILE).unlink()
    assert folder_kind(judge_folder) == "base"
    with pytest.raises(FileNotFoundError, match="neither a GRAM judge"):
        folder_kind(tmp_path / "empty")
