"""The Bradley-Terry baseline: learns a toy preference, scores in the scores contract, saves and reloads."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_contracts import SCORES, validate
from gram_core.baseline import BTScorer, RewardEncoder, RewardModel, bt_train_config, train_bradley_terry
from gram_core.config import EncodeConfig, TrainConfig
from gram_core.models import build_tiny_model
from gram_core.plans import train_judge
from gram_core.scorers import score_table

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
    scores = validate(score_table(scorer, held_out), SCORES)
    assert scores.column_names == SCORES.columns
    assert scores["id"].to_pylist() == held_out["pair_id"].to_pylist()
    assert np.mean(scores["correct"].to_pylist()) >= 0.9
    p1, p2 = scores["p_chosen_order1"].to_numpy(), scores["p_chosen_order2"].to_numpy()
    np.testing.assert_array_equal(p1, p2)  # a scalar reward has no slot order

    heard = []  # progress(done, total) after each batch of sequences, as the evaluate task logs it
    saved = BTScorer.load(scorer.save(tmp_path / "bt"))
    again = score_table(saved, held_out, progress=lambda done, total: heard.append((done, total)))
    assert len(heard) > 2 and heard[-1] == (128, 128) and heard == sorted(heard)
    np.testing.assert_allclose(again["p_chosen"].to_numpy(), scores["p_chosen"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize(("pairs", "order", "batch", "accum", "world", "epochs", "max_steps", "steps", "bt_batch"), [
    (10, "both", 4, 1, 1, 1.0, -1, 5, 2),         # a step = 2 pairs in both orders = 4 sequences
    (10, "random_half", 4, 1, 1, 1.0, -1, 3, 2),  # a step = 4 pairs in one order each: ceil(10 / 4)
    (10, "both", 5, 2, 1, 1.5, -1, 3, 2),         # 10 sequences = 5 pairs a step, 2 steps an epoch
    (9, "random_half", 8, 2, 2, 2.0, -1, 2, 4),   # 32 pairs a step across 2 workers: 1 step an epoch
    (3, "both", 1, 1, 1, 1.0, -1, 3, 1),          # batch 1: still one whole pair (both orders) a step
    (10, "random_half", 4, 1, 1, 1.0, 7, 7, 2),   # max_steps wins
])
def test_bt_config_matches_stage_2_steps(pairs, order, batch, accum, world, epochs, max_steps, steps, bt_batch):
    finetune = TrainConfig(learning_rate=3e-4, batch_size=batch, grad_accum_steps=accum, epochs=epochs,
                           max_steps=max_steps, warmup_ratio=0.2, seed=5)
    bt = bt_train_config(finetune, EncodeConfig(order=order), pairs, world)
    assert (bt.max_steps, bt.batch_size) == (steps, bt_batch)
    assert (bt.learning_rate, bt.grad_accum_steps, bt.warmup_ratio, bt.seed) == (3e-4, accum, 0.2, 5)
    with pytest.raises(ValueError, match="num_pairs"):
        bt_train_config(finetune, EncodeConfig(order=order), 0, world)


@pytest.mark.parametrize("order", ["both", "random_half"])
def test_bt_run_takes_as_many_steps_as_the_judge_run(tiny_tokenizer, order):
    rows = toy_pairs(6, seed=3)
    finetune = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1.5, warmup_ratio=0.0)
    encode = EncodeConfig(max_length=512, order=order)
    judge = train_judge(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, rows, finetune, encode)
    seen = []
    _, bt = train_bradley_terry(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, rows,
                                bt_train_config(finetune, encode, len(rows)), encode,
                                on_metrics=lambda step, metrics: seen.append(step))
    assert judge.steps == {"both": 5, "random_half": 3}[order]  # ceil(1.5 * ceil(6 / pairs per step))
    assert bt.steps == judge.steps and seen == list(range(1, judge.steps + 1))
