"""The shared-segment stage-2 step (gram_core.shared_forward) against today's step: same loss, same gradients.

Each cut is pinned on its own: the pair's shared prefix (both orders vs one order per pair), the frozen layers
(with and without a frozen boundary, cache cold and warm), the last layer at the verdict only (every model
here runs it), and the preamble once per optimizer step across micro-batches.
"""

import pytest
import torch
from toy_data import better_pairs

from gram_core.config import TrainConfig
from gram_core.encoding import JudgeEncoder, encode_preference_pairs
from gram_core.models import build_tiny_model
from gram_core.shared_forward import collate_shared_judge, common_prefix, first_trainable_layer, supports
from gram_core.steps import collate_judge, judge_step_fn, shared_judge_step_fn
from gram_core.training import train

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _freeze_below(model, boundary):
    for p in model.parameters():
        p.requires_grad_(True)
    model.model.embed_tokens.weight.requires_grad_(boundary == 0)
    for index, layer in enumerate(model.model.layers):
        for p in layer.parameters():
            p.requires_grad_(index >= boundary)
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _today(model, encoder, examples, pad_id):
    model.zero_grad(set_to_none=True)
    batch = collate_judge(pad_id)(examples)
    loss, metrics = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, reuse_prefix=True)(model, batch)
    loss.backward()
    return float(loss), float(metrics["margin"]), _grads(model)


def _shared(model, encoder, examples, pad_id, step=None):
    model.zero_grad(set_to_none=True)
    step = step or shared_judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, cache_bytes=1 << 26)
    loss, metrics = step(model, collate_shared_judge(pad_id)(examples))
    loss.backward()
    return float(loss), float(metrics["margin"]), _grads(model)


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-6)
    assert a[1] == pytest.approx(b[1], rel=1e-5, abs=1e-6)
    assert set(a[2]) == set(b[2]) and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layers,boundary", [(2, 0), (3, 1), (3, 2), (4, 3)])
@pytest.mark.parametrize("order", ["both", "random_half"])
def test_shared_step_matches_todays_step(tiny_tokenizer, layers, boundary, order):
    """Loss, margin and every trainable gradient equal today's prefix-reuse step: pairs in both orders share
    their prefix, one order per pair shares nothing; the frozen layers below ``boundary`` run without grad."""
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, better_pairs(5, seed=3), order=order, seed=0)
    model = _freeze_below(build_tiny_model(tiny_tokenizer, seed=1, layers=layers), boundary)
    assert supports(model) and first_trainable_layer(model) == boundary
    _assert_same(_shared(model, encoder, examples, tiny_tokenizer.pad_token_id),
                 _today(model, encoder, examples, tiny_tokenizer.pad_token_id))


def test_pairs_share_their_question_and_a_header(tiny_tokenizer):
    """Both orders of a pair are one group whose shared segment is the question + A header; singletons share none."""
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, better_pairs(3, seed=2), order="both")
    batch = collate_shared_judge(tiny_tokenizer.pad_token_id)(examples)
    assert batch["group"].tolist() == [0, 0, 1, 1, 2, 2]
    first = encoder.encode(better_pairs(3, seed=2)[0]["prompt"], "x", "y")
    assert int(batch["shared_len"][0]) >= first.a_start  # at least the question, the prompt and the A header
    single = collate_shared_judge(tiny_tokenizer.pad_token_id)(examples[:1])
    assert single["shared_len"].tolist() == [0]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2 and common_prefix([[1, 2], [3]]) == 0


def test_warm_frozen_cache_gives_the_same_step_and_is_used(tiny_tokenizer):
    """A second step on the same sequences reads the frozen layers' outputs from the cache: same numbers."""
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, better_pairs(4, seed=5), order="both")
    model = _freeze_below(build_tiny_model(tiny_tokenizer, seed=2, layers=3), 2)
    step = shared_judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, cache_bytes=1 << 26)
    cold = _shared(model, encoder, examples, tiny_tokenizer.pad_token_id, step)
    warm = _shared(model, encoder, examples, tiny_tokenizer.pad_token_id, step)
    assert step.step_prefix.cache_misses == 4 and step.step_prefix.cache_hits == 4
    _assert_same(warm, cold)
    _assert_same(warm, _today(model, encoder, examples, tiny_tokenizer.pad_token_id))


def test_no_cache_budget_caches_nothing(tiny_tokenizer):
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, better_pairs(2, seed=5), order="both")
    model = _freeze_below(build_tiny_model(tiny_tokenizer, seed=2, layers=3), 2)
    step = shared_judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, cache_bytes=0)
    for _ in range(2):
        _shared(model, encoder, examples, tiny_tokenizer.pad_token_id, step)
    assert step.step_prefix.cache_hits == 0 and step.step_prefix.cache_misses == 4


def test_shared_training_run_matches_todays_run(tiny_tokenizer):
    """Three steps of 2 micro-batches each (the preamble once per step, its gradient summed over both), over
    more than one epoch (the frozen cache is hit): same losses and weights as today's trainer."""
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, better_pairs(4, seed=4), order="both")
    from gram_core.batching import preference_groups

    config = TrainConfig(learning_rate=3e-3, batch_size=2, grad_accum_steps=2, max_steps=3, warmup_ratio=0.0)
    runs = []
    for shared in (True, False):
        model = _freeze_below(build_tiny_model(tiny_tokenizer, seed=0, layers=3), 1)
        if shared:
            step_fn = shared_judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, cache_bytes=1 << 26)
            collate = collate_shared_judge(tiny_tokenizer.pad_token_id)
        else:
            step_fn = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1)
            collate = collate_judge(tiny_tokenizer.pad_token_id)
        result = train(model, examples, step_fn, config, collate=collate, groups=preference_groups(4, "both"),
                       lengths=[len(e["suffix_ids"]) for e in examples])
        runs.append(([row["train/loss"] for row in result.history],
                     {n: p.detach().clone() for n, p in model.named_parameters()}, step_fn.step_prefix))
    assert runs[0][2].cache_hits > 0  # 3 steps x 2 pairs over 4 pairs: the second epoch reads the cache
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    start = {n: p.detach() for n, p in _freeze_below(build_tiny_model(tiny_tokenizer, seed=0, layers=3), 1)
             .named_parameters()}
    moved = max(float((w - start[n]).abs().max()) for n, w in runs[1][1].items())
    assert moved > 5e-3  # AdamW moved weights by ~lr per step ...
    for name, weight in runs[0][1].items():  # ... and turns rounding noise in near-zero gradients into < 1e-3
        torch.testing.assert_close(weight, runs[1][1][name], atol=1e-3, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("boundary", [0, 2])
def test_bt_shared_prompt_matches_todays_bt_step(tiny_tokenizer, boundary):
    """BT: chosen and rejected share the prompt (and the template head, the preamble): same loss, margin and
    gradients, the reward head's included, as the plain BT step on full sequences."""
    from gram_core.baseline import (
        RewardEncoder,
        RewardModel,
        bt_step_fn,
        collate_bt,
        collate_shared_bt,
        encode_bt_pairs,
        shared_bt_step_fn,
    )

    encoder = RewardEncoder(tiny_tokenizer, 512)
    examples = encode_bt_pairs(encoder, better_pairs(5, seed=6))
    model = RewardModel(_freeze_below(build_tiny_model(tiny_tokenizer, seed=3, layers=3), boundary), seed=0)
    runs = []
    for step, collate in ((bt_step_fn(), collate_bt(tiny_tokenizer.pad_token_id)),
                          (shared_bt_step_fn(encoder.head_ids, 1 << 26),
                           collate_shared_bt(tiny_tokenizer.pad_token_id, len(encoder.head_ids)))):
        model.zero_grad(set_to_none=True)
        loss, metrics = step(model, collate(examples))
        loss.backward()
        runs.append((float(loss), float(metrics["margin"]), _grads(model)))
    assert "head.weight" in runs[0][2]
    _assert_same(runs[1], runs[0])


@pytest.mark.slow
@pytest.mark.threads(2)
def test_shared_step_matches_todays_step_on_smollm2():
    """The demo's model and trainable layers (top 10 of 30) on 4 real starter pairs in both orders: loss and
    every trainable gradient equal today's step to 1e-5 (gradients relative to their tensor's largest entry)."""
    from gram_core.models import ModelSourceError, load_model
    from gram_core.starter import starter_preferences
    from tasks.settings import load_preset

    cfg = load_preset("demo", [])
    try:
        model, tokenizer = load_model(cfg.model)
    except ModelSourceError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    model.train()
    encoder = JudgeEncoder(tokenizer, cfg.encode.max_length)
    examples, _ = encode_preference_pairs(encoder, starter_preferences().slice(0, 4).to_pylist(), order="both")
    assert supports(model) and first_trainable_layer(model) == 20
    shared = _shared(model, encoder, examples, tokenizer.pad_token_id)
    today = _today(model, encoder, examples, tokenizer.pad_token_id)
    assert shared[0] == pytest.approx(today[0], rel=1e-5) and shared[1] == pytest.approx(today[1], rel=1e-5, abs=1e-5)
    assert set(shared[2]) == set(today[2]) and len(today[2]) > 0
    for name, grad in today[2].items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(shared[2][name], grad, atol=1e-5 * scale, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_judge_preference_shares_each_pairs_prompt_with_the_same_scores(tiny_tokenizer):
    """Scoring: both orders of a pair in one batch, their question and A header once; P per order equals
    today's prob_a of each order alone (to float32 noise)."""
    import numpy as np

    from gram_core.config import JudgeConfig
    from gram_core.judging import Judge

    model = build_tiny_model(tiny_tokenizer, seed=4, layers=3).eval()
    rows = better_pairs(7, seed=8)
    judge = Judge(model, tiny_tokenizer, JudgeConfig(batch_size=4))
    assert judge.shared is not None
    prompts, chosen, rejected = ([r[k] for r in rows] for k in ("prompt", "chosen", "rejected"))
    calls = []
    logits = judge.shared.logits
    judge.shared.logits = lambda m, b: (calls.append(len(b["shared_keys"])), logits(m, b))[1]
    scores = judge.preference(prompts, chosen, rejected)
    assert sum(calls) == 7 and max(calls) == 2  # 7 pairs, 2 pairs (4 sequences) a batch
    np.testing.assert_allclose(scores.p_order1, judge.prob_a(prompts, chosen, rejected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores.p_order2, 1 - judge.prob_a(prompts, rejected, chosen), rtol=0, atol=1e-6)
