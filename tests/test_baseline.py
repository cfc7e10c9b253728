"""The Bradley-Terry baseline: learns a toy preference, scores in the scores contract, saves and reloads."""

import numpy as np
import pyarrow as pa
import torch

from data_contracts import SCORES, validate
from gram_core.baseline import BTScorer, RewardEncoder, RewardModel, train_bradley_terry
from gram_core.config import EncodeConfig, TrainConfig
from gram_core.models import build_tiny_model

LETTERS = "bcdfghjklmnpqrstvwxz"


def toy_pairs(n, seed):
    """The preferred response contains the marker word "better"; otherwise both are random filler."""
    rng = np.random.default_rng(seed)

    def filler():
        return " ".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))

    rows = []
    for i in range(n):
        chosen = filler().split()
        chosen.insert(int(rng.integers(len(chosen) + 1)), "better")
        rows.append({"pair_id": f"p{seed}-{i}", "prompt": filler(), "chosen": " ".join(chosen),
                     "rejected": filler(), "source": "toy"})
    return rows


def test_reward_encoder_shortens_the_response_first(tiny_tokenizer):
    encoder = RewardEncoder(tiny_tokenizer, max_length=64, response_floor=8)
    short = encoder.encode("q r", "s t")
    long = encoder.encode("q r", " ".join(["s"] * 200))
    assert len(long) == 64 and long[-len(encoder.tail_ids):] == encoder.tail_ids
    assert long[:len(short) - len(encoder.tail_ids) - 2] == short[:len(short) - len(encoder.tail_ids) - 2]


def test_reward_is_read_at_the_last_real_token_under_padding(tiny_model):
    model = RewardModel(tiny_model, seed=1)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :3], mask[1:, :3])
    assert batch.shape == (2,)
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-4)
    assert model.head.weight.abs().sum() > 0 and torch.equal(model.head.weight, RewardModel(tiny_model, 1).head.weight)


def test_bradley_terry_learns_toy_preference_and_round_trips(tiny_tokenizer, tmp_path):
    base = build_tiny_model(tiny_tokenizer, seed=0)
    config = TrainConfig(learning_rate=3e-3, batch_size=8, epochs=6, warmup_ratio=0.1, seed=0)
    reward_model, result = train_bradley_terry(base, tiny_tokenizer, toy_pairs(96, seed=1), config,
                                               EncodeConfig(max_length=128), head_seed=0)
    assert result.steps == 72 and result.final_metrics["train/accuracy"] > 0.9

    held_out = pa.Table.from_pylist(toy_pairs(64, seed=2))
    scorer = BTScorer(reward_model, tiny_tokenizer, max_length=128)
    scores = validate(scorer.score_pairs(held_out), SCORES)
    assert scores.column_names == SCORES.columns
    assert scores["id"].to_pylist() == held_out["pair_id"].to_pylist()
    assert np.mean(scores["correct"].to_pylist()) >= 0.9
    p1, p2 = scores["p_chosen_order1"].to_numpy(), scores["p_chosen_order2"].to_numpy()
    np.testing.assert_array_equal(p1, p2)  # a scalar reward has no slot order

    saved = BTScorer.load(scorer.save(tmp_path / "bt"))
    again = saved.score_pairs(held_out)
    np.testing.assert_allclose(again["p_chosen"].to_numpy(), scores["p_chosen"].to_numpy(), atol=1e-5)
