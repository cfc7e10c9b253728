"""The reward server's request shapes without Ray or a model: pairs built from each endpoint's JSON, answers
read back from hand-made probabilities, and the limits."""

import json
import math

import numpy as np
import pytest

from tasks.serve_api import RequestError, ServeLimits, grpo_job, openrlhf_job, pairwise_job, parse_body


def test_openrlhf_pairs_and_answer_in_both_reward_modes():
    body = {"query": ["Q1 A1", "Q2 A2"], "prompts": ["Q1 ", "Q2 "], "labels": ["R1", "R2"]}
    job = openrlhf_job(body, ServeLimits())
    assert job.pairs == [("Q1 ", "A1", "R1"), ("Q2 ", "A2", "R2")] and job.rows == 4
    p1, p2 = np.array([0.9, 0.2]), np.array([0.7, 0.4])
    answer = job.answer(p1, p2)
    assert answer["rewards"] == pytest.approx([0.8, 0.3]) and answer["scores"] == answer["rewards"]
    assert answer["extra_logs"]["gram_p_order1"] == pytest.approx([0.9, 0.2])
    logit = openrlhf_job(body, ServeLimits(reward="logit")).answer(np.array([1.0, 0.5]), np.array([1.0, 0.5]))
    assert logit["rewards"][1] == 0 and math.isfinite(logit["rewards"][0]) and logit["scores"] == [1.0, 0.5]
    json.dumps(answer)  # plain JSON types only


def test_grpo_group_relative_answer_from_hand_made_probabilities():
    job = grpo_job({"groups": [{"prompt": "p", "completions": ["a", "b", "c"]}]}, ServeLimits())
    assert job.pairs == [("p", "a", "b"), ("p", "a", "c"), ("p", "b", "c")]
    p = np.array([0.8, 0.6, 0.3])  # P(a>b), P(a>c), P(b>c)
    rewards = job.answer(p, p)["rewards"][0]
    assert rewards == pytest.approx([(0.8 + 0.6) / 2, (0.2 + 0.3) / 2, (0.4 + 0.7) / 2])


def test_nan_never_reaches_an_answer():
    job = pairwise_job({"items": [{"prompt": "p", "a": "x", "b": "y"}]}, ServeLimits())
    with pytest.raises(ArithmeticError):
        job.answer(np.array([np.nan]), np.array([0.5]))


@pytest.mark.parametrize("raw, status, words", [
    (b"[1, 2]", 422, "expected a JSON object"),
    (b"\xff", 422, "not valid JSON"),
    (b"{" + b" " * 200 + b"}", 413, "cap 100"),
])
def test_parse_body(raw, status, words):
    with pytest.raises(RequestError) as err:
        parse_body(raw, ServeLimits(max_body_bytes=100))
    assert err.value.status == status and words in err.value.reason


def test_limits_are_checked():
    with pytest.raises(ValueError, match="reward"):
        ServeLimits(reward="raw")
    with pytest.raises(ValueError, match="max_group=16"):
        ServeLimits(max_rows=64)  # a 16-completion group is 240 sequences
