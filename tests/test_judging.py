"""Judge readout: P(A) against a plain forward, swap symmetry, batching and prefix-cache invariance,
scores-contract output (scorers.score_table), tournaments with a stub judge (reward_scoring), and one check on
the real SmolLM2."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_contracts import SCORES
from gram_core.config import JudgeConfig
from gram_core.judging import Judge, position_consistency
from gram_core.reward_scoring import best_of_n, rank, rewards_vs_reference
from gram_core.scorers import score_table

PROMPTS = ["What is two plus two?", "Name a colour.", "Write a very short poem about the sea and the wind.",
           "Say hi.", "Explain why the sky is blue in one sentence."]
R1 = ["Four.", "Blue, like the sky on a clear day.", "Waves roll in, the wind sings low.", "Hi!",
      "Air scatters short blue wavelengths of sunlight more than the long red ones."]
R2 = ["It is 5.", "Red.", "The sea.", "Hello there, how are you doing today?", "Because it is."]


def make_judge(model, tokenizer, **kw):
    return Judge(model, tokenizer, JudgeConfig(**{"max_length": 1024, **kw}))


def test_prob_a_matches_direct_full_vocab_forward(tiny_model, tiny_tokenizer):
    judge = make_judge(tiny_model, tiny_tokenizer, batch_size=2)
    p = judge.prob_a(PROMPTS, R1, R2)
    enc = judge.encoder
    with torch.no_grad():
        for i, (x, a, b) in enumerate(zip(PROMPTS, R1, R2, strict=True)):
            ids = enc.full_ids(enc.encode(x, a, b))
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]  # all vocab, last position
            z = logits[list(enc.label_ids)].double()
            assert p[i] == pytest.approx(torch.softmax(z, dim=0)[0].item(), abs=1e-5)
    assert p.dtype == np.float64 and np.ptp(p) > 1e-4  # a real, input-dependent readout


def test_swap_symmetry_is_exact(tiny_model, tiny_tokenizer):
    judge = make_judge(tiny_model, tiny_tokenizer, batch_size=1)
    forward, backward = judge.preference(PROMPTS, R1, R2), judge.preference(PROMPTS, R2, R1)
    np.testing.assert_allclose(forward.p + backward.p, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(backward.p_order1, 1.0 - forward.p_order2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(forward.p, (forward.p_order1 + forward.p_order2) / 2, rtol=0, atol=1e-15)
    # With batches of mixed composition the identity holds up to float32 kernel noise.
    judge = make_judge(tiny_model, tiny_tokenizer, batch_size=4)
    np.testing.assert_allclose(judge.preference(PROMPTS, R1, R2).p + judge.preference(PROMPTS, R2, R1).p, 1.0,
                               atol=1e-6)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_batch_size_invariance_with_partial_last_batch(tiny_model, tiny_tokenizer, reuse_prefix):
    reference = make_judge(tiny_model, tiny_tokenizer, batch_size=1, reuse_prefix=reuse_prefix).preference(
        PROMPTS, R1, R2)
    for batch_size in (3, 10, 64):  # 10 sequences: 3 leaves a last batch of 1; 64 is one batch
        got = make_judge(tiny_model, tiny_tokenizer, batch_size=batch_size,
                         reuse_prefix=reuse_prefix).preference(PROMPTS, R1, R2)
        np.testing.assert_allclose(got.p_order1, reference.p_order1, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.p_order2, reference.p_order2, rtol=0, atol=1e-5)


def test_reuse_prefix_matches_full_forward(tiny_model, tiny_tokenizer):
    cached = make_judge(tiny_model, tiny_tokenizer, batch_size=3, reuse_prefix=True)
    plain = make_judge(tiny_model, tiny_tokenizer, batch_size=3, reuse_prefix=False)
    assert cached.prefix is not None and plain.prefix is None
    np.testing.assert_allclose(cached.prob_a(PROMPTS, R1, R2), plain.prob_a(PROMPTS, R1, R2), rtol=0, atol=1e-5)


def test_judge_restores_training_mode_and_keeps_no_grad(tiny_model, tiny_tokenizer):
    tiny_model.train()
    judge = make_judge(tiny_model, tiny_tokenizer)
    judge.prob_a(PROMPTS[:2], R1[:2], R2[:2])
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())


def test_score_table_writes_scores_contract_in_row_order(tiny_model, tiny_tokenizer):
    table = pa.table({"prompt": PROMPTS, "chosen": R1, "chosen_model": ["m"] * 5, "rejected": R2,
                      "rejected_model": ["n"] * 5, "subset": ["llmbar-natural"] * 3 + ["hep-go"] * 2,
                      "id": pa.array([40, 7, 13, 2, 99], pa.int64())})
    judge = make_judge(tiny_model, tiny_tokenizer, batch_size=3)
    seen = []
    scores = score_table(judge, table, progress=lambda done, total: seen.append((done, total)))
    assert scores.schema.equals(SCORES.schema)
    assert scores.column("id").to_pylist() == ["40", "7", "13", "2", "99"]
    assert scores.column("subset").to_pylist() == table.column("subset").to_pylist()
    direct = judge.preference(PROMPTS, R1, R2)
    np.testing.assert_allclose(scores.column("p_chosen_order1").to_numpy(), direct.p_order1, atol=1e-12)
    np.testing.assert_allclose(scores.column("p_chosen").to_numpy(), direct.p, atol=1e-12)
    assert scores.column("correct").to_pylist() == (direct.p > 0.5).tolist()
    assert seen[-1] == (10, 10) and [d for d, _t in seen] == sorted(d for d, _t in seen)
    expected_consistency = np.mean((direct.p_order1 > 0.5) == (direct.p_order2 > 0.5))
    assert position_consistency(scores) == pytest.approx(expected_consistency)
    from data_contracts.validate import validate
    validate(scores, "scores")


def test_score_table_accepts_preference_pairs_and_names_missing_columns(tiny_model, tiny_tokenizer):
    judge = make_judge(tiny_model, tiny_tokenizer)
    table = pa.table({"pair_id": ["a", "b"], "prompt": PROMPTS[:2], "chosen": R1[:2], "rejected": R2[:2],
                      "source": ["hh", "hh"]})
    scores = score_table(judge, table)
    assert scores.column("id").to_pylist() == ["a", "b"] and scores.column("subset").to_pylist() == ["hh", "hh"]
    with pytest.raises(ValueError, match=r"needs one of the columns \['rejected'\]"):
        score_table(judge, table.drop_columns(["rejected"]))


def test_reward_vs_reference_is_preference_over_reference(tiny_model, tiny_tokenizer):
    judge = make_judge(tiny_model, tiny_tokenizer)
    reward = rewards_vs_reference(judge, PROMPTS, R1, R2)
    np.testing.assert_array_equal(reward, judge.preference(PROMPTS, R1, R2).p)  # the former pointwise_reward
    assert np.all((reward > 0) & (reward < 1))


class LengthJudge(Judge):
    """A stub judge that prefers the longer response in slot A; records each prob_a batch size."""

    def __init__(self):
        self.calls = []

    def prob_a(self, prompts, responses_a, responses_b, progress=None, ids=None):
        self.calls.append(len(prompts))
        diff = np.array([len(a) - len(b) for a, b in zip(responses_a, responses_b, strict=True)], float)
        return 1.0 / (1.0 + np.exp(-diff))


@pytest.mark.parametrize("lengths", [[3], [2, 9], [5, 1, 8], [4, 7, 2, 12, 6], [1, 2, 3, 4, 5, 6, 7, 30]])
def test_best_of_n_knockout_uses_n_minus_1_comparisons(lengths):
    judge = LengthJudge()
    candidates = ["x" * n for n in lengths]
    winner, comparisons = best_of_n(judge, "prompt", candidates)
    assert winner == int(np.argmax(lengths))
    assert comparisons == len(lengths) - 1
    assert len(judge.calls) == math.ceil(math.log2(len(lengths)))  # one batched call per round
    assert sum(judge.calls) == 2 * (len(lengths) - 1)  # two orders per comparison


def test_rank_orders_by_round_robin_wins():
    judge = LengthJudge()
    order, wins = rank(judge, "prompt", ["xx", "xxxxx", "x", "xxx"])
    assert order == [1, 3, 0, 2]
    np.testing.assert_allclose(wins + wins.T, 1.0)
    assert len(judge.calls) == 1


def test_best_of_n_needs_candidates():
    with pytest.raises(ValueError, match="no candidates"):
        best_of_n(LengthJudge(), "p", [])


@pytest.mark.slow
def test_real_smollm2_scores_two_pairs_in_both_orders():
    from gram_core.config import ModelConfig
    from gram_core.models import load_model

    model, tokenizer = load_model(ModelConfig(source="smollm2"))
    judge = Judge(model, tokenizer, JudgeConfig(batch_size=4, max_length=512))
    id_a, id_b = judge.encoder.label_ids
    assert tokenizer.decode([id_a]) == "A" and tokenizer.decode([id_b]) == "B"
    assert tokenizer.encode("A", add_special_tokens=False) == [id_a]
    table = pa.table({"id": ["1", "2"], "subset": ["hep-go", "hep-go"], "prompt": PROMPTS[:2],
                      "chosen": R1[:2], "rejected": R2[:2]})
    scores = score_table(judge, table)
    for column in ("p_chosen_order1", "p_chosen_order2", "p_chosen"):
        values = scores.column(column).to_numpy()
        assert np.all(np.isfinite(values)) and np.all((values > 0) & (values < 1)), (column, values)


def test_truncation_is_counted_and_progress_bar_runs(tiny_model, tiny_tokenizer, capsys):
    judge = make_judge(tiny_model, tiny_tokenizer)
    judge.prob_a(PROMPTS[:1], R1[:1], R2[:1])
    assert judge.truncation["responses_shortened"] == 0
    short = make_judge(tiny_model, tiny_tokenizer, max_length=judge.encoder.fixed_length + 20)
    p = short.prob_a(PROMPTS[:1], ["long answer " * 40], ["short"], progress=True)
    assert short.truncation["sequences"] == 1 and short.truncation["responses_shortened"] == 1
    assert short.truncation["tokens_removed"] > 0 and 0 < p[0] < 1
    assert "judging" in capsys.readouterr().err
