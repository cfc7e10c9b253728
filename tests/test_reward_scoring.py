"""The scoring operations: shared-prefix scoring equal to the naive full forward within 1e-4 with fewer tokens
computed; the group / reference / knockout / rank readouts against hand-computed values; each operation equal
to the formula it replaced (judging.pointwise_reward, judging.best_of_n and rank, and the former grouped
pairwise) to 1e-6 or exactly; a BT scorer through the same operations."""

import numpy as np
import pytest
import torch

from gram_core.config import JudgeConfig
from gram_core.judging import Judge
from gram_core.reward_scoring import (
    ScoreStats,
    best_of_n,
    extend_prefix,
    group_rewards,
    pairwise,
    prob_a,
    rank,
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
    np.testing.assert_allclose(rewards_vs_reference(shared, [PROMPT] * 8, COMPLETIONS, refs, share=True), want.p,
                               atol=1e-4)
    got = pairwise(shared, [PROMPT] * 8, COMPLETIONS, refs, share=True, max_rows=2, max_tokens=200)
    np.testing.assert_allclose(got.p_order1, want.p_order1, atol=1e-4)
    np.testing.assert_allclose(got.p_order2, want.p_order2, atol=1e-4)
    swapped = pairwise(shared, [PROMPT] * 8, refs, COMPLETIONS, share=True)
    np.testing.assert_allclose(got.p + swapped.p, 1.0, atol=1e-6)


def test_group_rewards_are_mean_win_probabilities(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    cands = COMPLETIONS[:4]
    got = group_rewards(shared, PROMPT, cands, share=True)
    expected = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        expected.append(naive.preference([PROMPT] * 3, [cands[i]] * 3, [cands[j] for j in others]).p.mean())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got.mean() == pytest.approx(0.5, abs=1e-9)  # wins and losses of a round robin balance
    assert group_rewards(shared, PROMPT, ["only one"]).tolist() == [0.5]
    with pytest.raises(ValueError, match="max_n=3"):
        group_rewards(shared, PROMPT, cands, max_n=3)


def test_best_of_n_is_the_same_knockout_in_either_batching(tiny_model, tiny_tokenizer):
    shared, naive = judges(tiny_model, tiny_tokenizer)
    assert best_of_n(shared, PROMPT, COMPLETIONS[:5], share=True) == best_of_n(naive, PROMPT, COMPLETIONS[:5])


def former_grouped_pairwise(judge, prompts, r1, r2):
    """reward_scoring.pairwise before the engine was one: both orders through prob_a, read by hand."""
    n = len(prompts)
    p_a = prob_a(judge, prompts + prompts, r1 + r2, r2 + r1)
    return p_a[:n], 1.0 - p_a[n:], (p_a[:n] + 1.0 - p_a[n:]) / 2


def former_knockout(judge, prompt, candidates):
    """judging.best_of_n before the engine was one: Judge.preference per round."""
    alive, comparisons = list(range(len(candidates))), 0
    while len(alive) > 1:
        pairs = list(zip(alive[0::2], alive[1::2], strict=False))
        p = judge.preference([prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                             [candidates[j] for _, j in pairs]).p
        comparisons += len(pairs)
        alive = [i if q > 0.5 else j for (i, j), q in zip(pairs, p, strict=True)] + alive[len(alive) // 2 * 2:]
    return alive[0], comparisons


def test_each_operation_equals_the_formula_it_replaced(tiny_model, tiny_tokenizer):
    judge = Judge(tiny_model, tiny_tokenizer, JudgeConfig(max_length=1024, batch_size=4))
    n, refs = len(COMPLETIONS), [REFERENCE] * len(COMPLETIONS)
    # rewards against a reference: judging.pointwise_reward was Judge.preference(...).p
    pair_path = judge.preference([PROMPT] * n, COMPLETIONS, refs)
    np.testing.assert_allclose(rewards_vs_reference(judge, [PROMPT] * n, COMPLETIONS, refs), pair_path.p,
                               rtol=0, atol=1e-6)
    # ... and reward_scoring's grouped one was prob_a over both orders
    p1, p2, p = former_grouped_pairwise(judge, [PROMPT] * n, COMPLETIONS, refs)
    got = pairwise(judge, [PROMPT] * n, COMPLETIONS, refs, share=True)
    for new, old in ((got.p_order1, p1), (got.p_order2, p2), (got.p, p)):
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rewards_vs_reference(judge, [PROMPT] * n, COMPLETIONS, refs, share=True), p,
                               rtol=0, atol=1e-6)
    # group rewards: the mean of the round-robin wins, from the grouped pairs
    cands = COMPLETIONS[:5]
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    _, _, p_ij = former_grouped_pairwise(judge, [PROMPT] * len(pairs), [cands[i] for i, _ in pairs],
                                         [cands[j] for _, j in pairs])
    wins = np.full((5, 5), 0.5)
    for (i, j), q in zip(pairs, p_ij, strict=True):
        wins[i, j], wins[j, i] = q, 1.0 - q
    np.testing.assert_allclose(group_rewards(judge, PROMPT, cands, share=True), (wins.sum(axis=1) - 0.5) / 4,
                               rtol=0, atol=1e-6)
    # rank: judging.rank's round robin on Judge.preference
    order, got_wins = rank(judge, PROMPT, cands)
    pair_p = judge.preference([PROMPT] * len(pairs), [cands[i] for i, _ in pairs], [cands[j] for _, j in pairs]).p
    for (i, j), q in zip(pairs, pair_p, strict=True):
        wins[i, j], wins[j, i] = q, 1.0 - q
    np.testing.assert_allclose(got_wins, wins, rtol=0, atol=1e-6)
    assert order == sorted(range(5), key=lambda i: -(wins[i].sum() - 0.5))
    # best-of-n: judging.best_of_n's knockout on Judge.preference
    assert best_of_n(judge, PROMPT, COMPLETIONS) == former_knockout(judge, PROMPT, COMPLETIONS)


def test_a_bt_scorer_goes_through_the_same_operations(tiny_model, tiny_tokenizer):
    """A scalar reward model has no slots: pairwise is σ(r1 − r2) in both "orders"; batching options are
    ignored; the operations built on pairwise take it as they take a judge."""
    from gram_core.baseline import BTScorer, RewardModel

    scorer = BTScorer(RewardModel(tiny_model, seed=3), tiny_tokenizer, max_length=256)
    r = scorer.rewards([PROMPT] * 4, COMPLETIONS[:4])
    got = pairwise(scorer, [PROMPT] * 3, COMPLETIONS[:3], COMPLETIONS[1:4], share=True, max_rows=2)
    np.testing.assert_allclose(got.p, 1 / (1 + np.exp(-(r[:3] - r[1:4]))), rtol=0, atol=1e-6)  # other batches
    np.testing.assert_array_equal(got.p_order1, got.p_order2)
    assert best_of_n(scorer, PROMPT, COMPLETIONS[:4])[0] == int(np.argmax(r))  # a scalar reward is transitive
    assert rank(scorer, PROMPT, COMPLETIONS[:4])[0] == list(np.argsort(-r))
    assert group_rewards(scorer, PROMPT, COMPLETIONS[:4]).argmax() == int(np.argmax(r))


def test_batching_options_need_a_share_choice(tiny_model, tiny_tokenizer):
    judge, _ = judges(tiny_model, tiny_tokenizer)
    with pytest.raises(TypeError, match="max_rows"):
        pairwise(judge, [PROMPT], ["a"], ["b"], max_rows=2)


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


def test_knockout_follows_the_one_tie_rule_and_counts_n_minus_one_comparisons():
    """``knockout`` (best_of_n here, the reward server's /v1/best_of_n there): an exact tie (P = 0.5) lets the
    later candidate advance (report.is_correct: strictly above 0.5 wins); a lone survivor gets a bye; one
    candidate needs no round; none is refused."""
    from gram_core.judging import PairScores
    from gram_core.reward_scoring import best_of_n, knockout

    class Ties:
        def preference(self, prompts, responses_1, responses_2):
            p = np.full(len(prompts), 0.5)
            return PairScores(p_order1=p, p_order2=p, p=p)

    assert best_of_n(Ties(), "q", ["a", "b", "c", "d", "e"]) == (4, 4)  # every tie goes to the later one
    rounds = knockout(3)
    assert next(rounds) == [(0, 1)]
    assert rounds.send(np.array([0.5000001])) == [(0, 2)]  # 0 won, 2 had the bye
    with pytest.raises(StopIteration) as done:
        rounds.send(np.array([0.5]))
    assert done.value.value == (2, 2)
    assert best_of_n(Ties(), "q", ["only"]) == (0, 0)
    with pytest.raises(ValueError, match="no candidates"):
        best_of_n(Ties(), "q", [])
