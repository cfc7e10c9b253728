"""Shared-prefix reward scoring: equal to the naive full forward within 1e-4, fewer tokens computed, and the
group / reference / knockout readouts against hand-computed values."""

import numpy as np
import pytest
import torch

from gram_core.config import JudgeConfig
from gram_core.judging import Judge
from gram_core.judging import best_of_n as plain_best_of_n
from gram_core.reward_scoring import (
    ScoreStats,
    best_of_n,
    extend_prefix,
    group_rewards,
    pairwise,
    prob_a,
    reward_logit,
    rewards_vs_reference,
)

PROMPT = "Write a very short poem about the sea."
COMPLETIONS = ["Waves roll in.", "The sea is big and blue and wide.", "Salt.", "Gulls cry over grey water.",
               "Tides come and go, the moon pulls them.", "Sea sea sea.", "Blue.", "Foam on the sand at dusk."]
REFERENCE = "The sea sings softly under a pale moon."


def judges(model, tokenizer, **kw):
    shared = Judge(model, tokenizer, JudgeConfig(max_length=1024, batch_size=3, **kw))
    naive = Judge(model, tokenizer, JudgeConfig(max_length=1024, batch_size=1, reuse_prefix=False))
    return shared, naive


def test_shared_prefix_matches_naive_full_forward(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    n = len(COMPLETIONS)
    prompts = [PROMPT] * n + ["Say hi.", "Name a colour."]
    a = [REFERENCE] * n + ["Hi!", "Red."]
    b = COMPLETIONS + ["Hello there.", "Blue, like the sky."]
    stats = ScoreStats()
    got = prob_a(shared, prompts, a, b, stats=stats)
    want = naive.prob_a(prompts, a, b)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.ptp(got) > 1e-4  # an input-dependent readout
    # The 8 sequences with the reference in slot A share template + prompt + reference; the two unrelated ones
    # are pooled behind the template (a prefix of their own would save nothing).
    assert stats.groups == 2 and stats.sequences == 10
    assert stats.prefix_tokens + stats.suffix_tokens < stats.naive_tokens
    pooled = ScoreStats()  # no group saves 10^9 tokens: everything behind the template, as share=False
    np.testing.assert_allclose(prob_a(shared, prompts, a, b, stats=pooled, min_saved_tokens=10**9), want, atol=1e-4)
    assert pooled.groups == 1 and pooled.prefix_tokens == 0


def test_rewards_vs_reference_and_pairwise_equal_judge_preference(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    refs = [REFERENCE] * len(COMPLETIONS)
    want = naive.preference([PROMPT] * len(COMPLETIONS), COMPLETIONS, refs)
    np.testing.assert_allclose(rewards_vs_reference(shared, [PROMPT] * 8, COMPLETIONS, refs), want.p, atol=1e-4)
    got = pairwise(shared, [PROMPT] * 8, COMPLETIONS, refs, max_rows=2, max_tokens=200)
    np.testing.assert_allclose(got.p_order1, want.p_order1, atol=1e-4)
    np.testing.assert_allclose(got.p_order2, want.p_order2, atol=1e-4)
    swapped = pairwise(shared, [PROMPT] * 8, refs, COMPLETIONS)
    np.testing.assert_allclose(got.p + swapped.p, 1.0, atol=1e-6)


def test_group_rewards_are_mean_win_probabilities(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    cands = COMPLETIONS[:4]
    got = group_rewards(shared, PROMPT, cands)
    expected = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        expected.append(naive.preference([PROMPT] * 3, [cands[i]] * 3, [cands[j] for j in others]).p.mean())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got.mean() == pytest.approx(0.5, abs=1e-9)  # wins and losses of a round robin balance
    assert group_rewards(shared, PROMPT, ["only one"]).tolist() == [0.5]
    with pytest.raises(ValueError, match="max_n=3"):
        group_rewards(shared, PROMPT, cands, max_n=3)


def test_best_of_n_is_the_rank_knockout(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    assert best_of_n(shared, PROMPT, COMPLETIONS[:5]) == plain_best_of_n(naive, PROMPT, COMPLETIONS[:5])


def test_extend_prefix_matches_one_forward(tiny_model, tiny_tokenizer):
    shared, _ = judges(tiny_model, tiny_tokenizer)
    ids = shared.encoder.full_ids(shared.encoder.encode(PROMPT, REFERENCE, COMPLETIONS[0]))
    whole = extend_prefix(tiny_model, None, ids[:40])
    stepped = extend_prefix(tiny_model, extend_prefix(tiny_model, None, ids[:25]), ids[:40])
    for (k1, v1), (k2, v2) in zip(whole.layers, stepped.layers, strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="base prefix"):
        extend_prefix(tiny_model, whole, ids[1:50])


def test_reward_logit_is_finite():
    out = reward_logit(np.array([0.0, 0.5, 1.0, 0.75]))
    assert np.all(np.isfinite(out)) and out[1] == 0 and out[3] == pytest.approx(np.log(3))
