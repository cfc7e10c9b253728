"""The quality study's evidence and its arms: paired section differences, study.arms, matched steps."""

import dataclasses

import numpy as np
import pytest

from gram_core.config import ConfigError
from gram_core.rewardbench import section_scores
from gram_core.study_report import differences_markdown, paired_differences, study_differences
from tasks.settings import StudyConfig, load_preset, stage_settings

SUBSETS = ["alpacaeval-easy"] * 40 + ["llmbar-natural"] * 40 + ["xstest-should-refuse"] * 40


def _scores(correct, ids=None, subsets=SUBSETS):
    ids = list(range(len(correct))) if ids is None else ids
    return {"id": ids, "subset": list(subsets), "p_chosen": [0.8 if c else 0.3 for c in correct]}


def test_point_differences_equal_the_section_scores_and_rows_pair_by_id():
    rng = np.random.default_rng(0)
    a, b = rng.random(120) < 0.8, rng.random(120) < 0.5
    diff = paired_differences(_scores(a), _scores(b))
    sa, sb = section_scores(_scores(a)), section_scores(_scores(b))
    for section in ("Chat", "Chat Hard", "Safety"):
        assert diff[section]["value"] == pytest.approx(sa.sections[section] - sb.sections[section])
    assert diff["overall"]["value"] == pytest.approx(sa.overall - sb.overall)
    assert diff["all pairs"]["value"] == pytest.approx(a.mean() - b.mean())
    assert diff["overall"]["low"] < diff["overall"]["value"] < diff["overall"]["high"]
    # the same rows listed in another order pair up by id: the result does not change
    order = rng.permutation(120)
    shuffled = {"id": [int(i) for i in order], "subset": [SUBSETS[i] for i in order],
                "p_chosen": [0.3 if not b[i] else 0.8 for i in order]}
    assert paired_differences(_scores(a), shuffled)["overall"] == diff["overall"]


def test_a_clear_gain_is_beyond_noise_and_an_equal_arm_within_it():
    rng = np.random.default_rng(1)
    good, bad = rng.random(120) < 0.85, rng.random(120) < 0.45
    assert not paired_differences(_scores(good), _scores(bad))["overall"]["within_noise"]
    flip = good.copy()
    flip[:3] = ~flip[:3]  # three pairs of 120 differ: no evidence either way
    close = paired_differences(_scores(good), _scores(flip))
    assert close["overall"]["within_noise"] and close["all pairs"]["within_noise"]
    text = "\n".join(differences_markdown(study_differences({"bt": _scores(bad), "gram": _scores(good),
                                                             "judge_no_stage1": _scores(flip)})))
    assert "| GRAM − Bradley-Terry reward model | **+" in text  # beyond noise: bold
    assert "| GRAM − generative judge, no stage 1 (ε = 0.1) | +" in text and "within noise" in text


def test_differences_need_the_same_pairs():
    with pytest.raises(ValueError, match="same pairs: 2 ids differ"):
        paired_differences(_scores([True] * 120), _scores([True] * 120, ids=[*range(119), 500]))


def test_study_arms_are_checked_and_the_no_stage1_judge_gets_stage1s_steps():
    from flows.study import no_stage1_settings

    with pytest.raises(ConfigError, match="unknown arm"):
        StudyConfig(arms=("gram", "gram_eps1"))
    with pytest.raises(ConfigError, match="must include 'gram'"):
        StudyConfig(arms=("bt",))
    study = load_preset("study").resolved()
    judge = stage_settings(study, "finetune")
    assert no_stage1_settings(study, judge).train.max_steps == study.finetune.max_steps + study.pretrain.max_steps
    same = dataclasses.replace(study, study=StudyConfig(match_total_steps=False))
    assert no_stage1_settings(same, judge) is judge
    gpu = load_preset("study-gpu", {"study": {"match_total_steps": True}}).resolved()
    with pytest.raises(ConfigError, match="needs finetune.max_steps and pretrain.max_steps"):
        no_stage1_settings(gpu, stage_settings(gpu, "finetune"))


def test_training_summary_finds_the_step_that_left_the_plateau():
    from gram_core.study_report import training_markdown, training_summary

    flat = [{"step": i + 1, "train/loss": 0.693} for i in range(40)]
    falling = flat[:20] + [{"step": 21 + i, "train/loss": 0.3} for i in range(20)]
    summary = training_summary(falling)
    # trailing 10-step means: 0.693 ... then (7 x 0.693 + 3 x 0.3) / 10 = 0.575 < 0.6 first at step 23
    assert summary == {"steps": 40, "first_loss": pytest.approx(0.693), "final_loss": pytest.approx(0.3),
                       "last_loss": pytest.approx(0.3), "exit_step": 23}
    assert training_summary(flat)["exit_step"] is None and training_summary([])["steps"] == 0
    short = [{"step": i + 1, "train/loss": loss} for i, loss in enumerate((0.7, 0.5, 0.4))]  # < 10 steps
    assert training_summary(short)["exit_step"] == 3 and training_summary(short[:1])["exit_step"] is None
    text = "\n".join(training_markdown({"stage1": training_summary(flat), "gram": summary,
                                        "judge_no_stage1": training_summary(flat)}))
    assert "| stage 1 (pre-training) | 40 | 0.693 | 0.693 | n/a (LM loss) |" in text
    assert "| GRAM: stage 1 + stage 2 (ε = 0.1) | 40 | 0.693 | 0.300 | 23 |" in text and "| never |" in text


def test_cue_rows_pick_by_one_feature_and_gram_is_compared_with_the_length_cue():
    from gram_core.study_report import LENGTH_CUE, cue_tables

    rows = {"id": [1, 2, 3], "subset": ["alpacaeval-easy"] * 3,
            "chosen": ["a long answer", "short", "same"], "rejected": ["short", "a long answer", "same"]}
    tables = cue_tables(rows)
    assert tables[LENGTH_CUE]["p_chosen"] == [1.0, 0.0, 0.5]
    assert tables["cue: prefer shorter"]["p_chosen"] == [0.0, 1.0, 0.5]
    gram = {"id": [3, 2, 1], "subset": ["alpacaeval-easy"] * 3, "p_chosen": [0.9, 0.8, 0.7]}
    diff = study_differences({"gram": gram}, cues=tables)
    assert list(diff) == [f"gram - {LENGTH_CUE}"]
    # A cue's tie counts half (gram_core.report), as in the run summary: the cue scores (1 + 0 + 0.5) / 3.
    assert diff[f"gram - {LENGTH_CUE}"]["all pairs"]["value"] == pytest.approx(1 - 0.5)
