"""The training loop on a tiny model: it learns, changes exactly the trainable weights, resumes exactly,
accumulates like one big batch, shards like one process, and stops on a non-finite loss."""

import json

import numpy as np
import pytest
import torch

from gram_core.config import EncodeConfig, JudgeConfig, ModelConfig, TrainConfig
from gram_core.losses import IGNORE_INDEX, lm_loss, optimal_margin
from gram_core.models import apply_trainable, build_tiny_model
from gram_core.plans import train_judge, train_pretrain
from gram_core.steps import collate_judge, collate_pretrain, judge_step_fn, pretrain_step_fn
from gram_core.training import NonFiniteLossError, train

WORDS = "red green blue cat dog sun moon tree river stone".split()


def lm_examples(tokenizer, n, seed=0):
    """Sentences of a fixed cyclic word order (learnable); the first 2 tokens carry no loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(len(WORDS), (1,), generator=gen))
        length = 4 + int(torch.randint(5, (1,), generator=gen))
        text = " ".join(WORDS[(start + k) % len(WORDS)] for k in range(length))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"pair_id": f"ex{i}", "input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return out


def fit(model, tokenizer, examples, **overrides):
    kw = {k: overrides.pop(k) for k in ("output_dir", "resume_from", "on_metrics", "on_checkpoint", "step_fn")
          if k in overrides}
    config = TrainConfig(**{"learning_rate": 3e-3, "batch_size": 4, "warmup_ratio": 0.0, **overrides})
    return train(model, examples, kw.pop("step_fn", pretrain_step_fn()), config,
                 collate=collate_pretrain(tokenizer.pad_token_id), lengths=[len(e["input_ids"]) for e in examples],
                 **kw)


def held_out_loss(model, tokenizer, examples):
    batch = collate_pretrain(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(lm_loss(logits, batch["labels"]))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_pretrain_step_loss_equals_full_logits_lm_loss(tiny_model, tiny_tokenizer):
    batch = collate_pretrain(tiny_tokenizer.pad_token_id)(lm_examples(tiny_tokenizer, 3))
    batch.pop("weight")
    with torch.no_grad():
        loss, _ = pretrain_step_fn()(tiny_model, batch)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(loss) == pytest.approx(float(lm_loss(logits, batch["labels"])), rel=1e-5)


def test_lm_training_lowers_held_out_loss_and_reports_metrics(tiny_model, tiny_tokenizer):
    train_set, held_out = lm_examples(tiny_tokenizer, 32, seed=1), lm_examples(tiny_tokenizer, 16, seed=2)
    before = held_out_loss(tiny_model, tiny_tokenizer, held_out)
    seen = []
    result = fit(tiny_model, tiny_tokenizer, train_set, epochs=4, log_every_steps=5, warmup_ratio=0.1,
                 on_metrics=lambda step, m: seen.append(step))
    after = held_out_loss(tiny_model, tiny_tokenizer, held_out)
    assert after < before - 1.0, (before, after)
    assert result.steps == 32 == len(result.history)  # 4 epochs x 8 batches of 4
    assert seen == [5, 10, 15, 20, 25, 30, 32]
    first, last = result.history[0], result.history[-1]
    assert first["train/lr"] == pytest.approx(0.0) and result.history[4]["train/lr"] == pytest.approx(3e-3)  # ceil(0.1 * 32) = 4 warm-up steps
    assert last["train/lr"] < 3e-3 * 0.01  # cosine decays to ~0
    assert last["train/loss"] < first["train/loss"]
    assert last["train/grad_norm"] > 0 and last["train/tokens_per_s"] > 0
    assert last["epoch"] == pytest.approx(4.0) and result.final_metrics == last


def test_full_finetune_changes_every_trainable_parameter(tiny_model, tiny_tokenizer):
    before = snapshot(tiny_model)
    fit(tiny_model, tiny_tokenizer, lm_examples(tiny_tokenizer, 8), max_steps=2)
    unchanged = [n for n, p in tiny_model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_lora_changes_only_lora_parameters(tiny_model, tiny_tokenizer):
    model = apply_trainable(tiny_model, ModelConfig(source="tiny", lora_r=4))
    before = snapshot(model)
    fit(model, tiny_tokenizer, lm_examples(tiny_tokenizer, 8), max_steps=2, learning_rate=1e-2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    # lora_A starts random, lora_B at zero: after two steps both have moved; nothing else has.
    assert changed == lora and len(lora) == 2 * 7 * 2


def test_frozen_layers_do_not_change(tiny_model, tiny_tokenizer):
    model = apply_trainable(tiny_model, ModelConfig(source="tiny", freeze_layers=1))
    before = snapshot(model)
    fit(model, tiny_tokenizer, lm_examples(tiny_tokenizer, 8), max_steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and "model.embed_tokens.weight" in frozen
    assert not changed & frozen
    assert any(n.startswith("model.layers.1.") for n in changed) and "model.norm.weight" in changed


def test_non_finite_loss_names_step_and_examples(tiny_model, tiny_tokenizer):
    inner = pretrain_step_fn()
    calls = []

    def poisoned(model, batch):
        loss, metrics = inner(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    examples = lm_examples(tiny_tokenizer, 16)
    with pytest.raises(NonFiniteLossError, match=r"step 2\b.*ex\d+") as err:
        fit(tiny_model, tiny_tokenizer, examples, batch_size=2, grad_accum_steps=2, step_fn=poisoned)
    assert len([e for e in examples if e["pair_id"] in str(err.value)]) == 2  # the bad micro-batch's two ids


def test_resume_continues_exactly(tiny_tokenizer, tmp_path):
    examples = lm_examples(tiny_tokenizer, 20)
    common = dict(batch_size=3, max_steps=6, warmup_ratio=0.2, weight_decay=0.01)
    straight = build_tiny_model(tiny_tokenizer, seed=0)
    full = fit(straight, tiny_tokenizer, examples, **common)

    first = build_tiny_model(tiny_tokenizer, seed=0)
    saved = []
    fit(first, tiny_tokenizer, examples, checkpoint_every_steps=3, output_dir=tmp_path,
        on_checkpoint=lambda path, m: saved.append(path), **common)
    assert saved == [str(tmp_path / "checkpoint-3"), str(tmp_path / "checkpoint-6")]
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3

    resumed = build_tiny_model(tiny_tokenizer, seed=5)  # different start: everything must come from the checkpoint
    result = fit(resumed, tiny_tokenizer, examples, resume_from=tmp_path / "checkpoint-3", **common)
    assert result.steps == 6 and [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert [h["train/loss"] for h in result.history] == pytest.approx([h["train/loss"] for h in full.history])
    reference = dict(straight.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, reference[name], atol=1e-6, rtol=0)


def test_resume_rejects_a_different_layout(tiny_model, tiny_tokenizer, tmp_path):
    examples = lm_examples(tiny_tokenizer, 8)
    fit(tiny_model, tiny_tokenizer, examples, max_steps=1, output_dir=tmp_path)
    with pytest.raises(ValueError, match="global_batch=4.*global_batch=2"):
        fit(tiny_model, tiny_tokenizer, examples, max_steps=1, batch_size=2, resume_from=tmp_path / "checkpoint-1")


def test_gradient_accumulation_matches_one_big_batch(tiny_tokenizer):
    examples = lm_examples(tiny_tokenizer, 16)
    big, accumulated = build_tiny_model(tiny_tokenizer, seed=0), build_tiny_model(tiny_tokenizer, seed=0)
    fit(big, tiny_tokenizer, examples, batch_size=4, max_steps=3)
    fit(accumulated, tiny_tokenizer, examples, batch_size=2, grad_accum_steps=2, max_steps=3)
    reference = dict(big.named_parameters())
    for name, p in accumulated.named_parameters():
        torch.testing.assert_close(p, reference[name], atol=1e-5, rtol=1e-4)


def _sharded_worker(rank, world, folder, examples):
    """One rank of a 2-process gloo run: per-rank batch 2 -> global batch 4."""
    import torch.distributed as dist

    from gram_core.models import build_tiny_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=0)
        result = fit(model, tokenizer, examples, batch_size=2, max_steps=4, output_dir=folder / f"out{rank}")
        torch.save({"params": dict(model.named_parameters()), "losses": [h["train/loss"] for h in result.history],
                    "checkpoint": result.checkpoint}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_sharding_matches_one_process(tiny_tokenizer, tmp_path):
    examples = lm_examples(tiny_tokenizer, 14)  # 14 = 3 global batches of 4 + 2: last shard sizes 1 and 1
    single = build_tiny_model(tiny_tokenizer, seed=0)
    reference = fit(single, tiny_tokenizer, examples, batch_size=4, max_steps=4)
    # fork: the children reuse the imported modules (spawn would re-import transformers: ~10 s)
    torch.multiprocessing.start_processes(_sharded_worker, args=(2, tmp_path, examples), nprocs=2,
                                          start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected = dict(single.named_parameters())
    for out in ranks:
        assert out["losses"] == pytest.approx([h["train/loss"] for h in reference.history], rel=1e-5)
        for name, p in out["params"].items():
            torch.testing.assert_close(p, expected[name], atol=1e-5, rtol=1e-4)
    assert ranks[0]["checkpoint"] == str(tmp_path / "out0" / "checkpoint-4")
    assert ranks[1]["checkpoint"] is None and not (tmp_path / "out1").exists()  # only rank 0 writes


LETTERS = "bcdfghjklmnpqrstvwxz"


def toy_pairs(n, seed):
    """Preferred responses repeat the word "better"; rejected ones (and prompts) are random letters."""
    rng = np.random.default_rng(seed)

    def filler():
        return " ".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))

    return [{"pair_id": f"p{seed}-{i}", "prompt": filler(), "chosen": " ".join(["better"] * int(rng.integers(3, 7))),
             "rejected": filler()} for i in range(n)]


def test_judge_learns_toy_preference_in_both_orders(tiny_tokenizer):
    from gram_core.judging import Judge

    # Width 32 rarely breaks the A/B symmetry behind the ~330-token instruction; width 64 does in ~30 steps.
    model = build_tiny_model(tiny_tokenizer, seed=0, hidden_size=64)
    config = TrainConfig(learning_rate=3e-3, batch_size=8, epochs=6, warmup_ratio=0.1, label_smoothing=0.1)
    result = train_judge(model, tiny_tokenizer, toy_pairs(96, seed=1), config, EncodeConfig(max_length=512))
    assert result.data_stats["pairs"] == 96 and result.data_stats["order"] == "random_half"
    assert result.steps == 72 and result.final_metrics["train/accuracy"] > 0.9
    # Smoothing caps the margin at Delta* = log((2 - eps) / eps) = 2.944 instead of growing without bound.
    assert result.final_metrics["train/margin"] == pytest.approx(optimal_margin(0.1), abs=0.3)

    held_out = toy_pairs(64, seed=2)
    judge = Judge(model, tiny_tokenizer, JudgeConfig(max_length=512))
    scores = judge.preference([r["prompt"] for r in held_out], [r["chosen"] for r in held_out],
                              [r["rejected"] for r in held_out])
    assert np.mean(scores.p > 0.5) >= 0.9
    assert np.mean(scores.p_order1 > 0.5) >= 0.9 and np.mean(scores.p_order2 > 0.5) >= 0.9


def test_judge_step_with_and_without_prefix_reuse_agree(tiny_model, tiny_tokenizer):
    from gram_core.encoding import JudgeEncoder, encode_preference_pairs

    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, toy_pairs(4, seed=3), seed=0)
    grads = []
    for reuse in (True, False):
        batch = collate_judge(tiny_tokenizer.pad_token_id, None if reuse else encoder.prefix_ids)(examples)
        loss, metrics = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, reuse_prefix=reuse)(tiny_model, batch)
        tiny_model.zero_grad()
        loss.backward()
        grads.append((float(loss), float(metrics["margin"]), tiny_model.model.layers[0].self_attn.q_proj.weight.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5) and grads[0][1] == pytest.approx(grads[1][1], abs=1e-5)
    assert grads[0][2].abs().sum() > 0  # the prefix is recomputed with grad: it reaches layer 0
    torch.testing.assert_close(grads[0][2], grads[1][2], atol=1e-6, rtol=1e-4)


def test_prefix_once_per_step_trains_like_full_sequences(tiny_tokenizer):
    """Three micro-batches per step share one prefix forward/backward: same losses and weights as full ids."""
    from gram_core.encoding import JudgeEncoder, encode_preference_pairs

    encoder = JudgeEncoder(tiny_tokenizer, 512)
    examples, _ = encode_preference_pairs(encoder, toy_pairs(12, seed=4), seed=0)
    config = TrainConfig(learning_rate=3e-3, batch_size=2, grad_accum_steps=3, max_steps=3, warmup_ratio=0.0)
    runs = []
    for reuse in (True, False):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        step_fn = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, reuse_prefix=reuse)
        collate = collate_judge(tiny_tokenizer.pad_token_id, None if reuse else encoder.prefix_ids)
        calls = []
        if reuse:
            begin = step_fn.step_prefix.begin
            step_fn.step_prefix.begin = lambda m, calls=calls, begin=begin: (calls.append(1), begin(m))
        result = train(model, examples, step_fn, config, collate=collate,
                       lengths=[len(e["suffix_ids"]) for e in examples])
        runs.append(([row["train/loss"] for row in result.history], snapshot(model), calls))
    assert runs[0][2] == [1, 1, 1]  # one prefix forward per optimizer step, not per micro-batch
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for name, weight in runs[0][1].items():  # Adam turns float-rounding noise in near-zero gradients into ~1e-5
        torch.testing.assert_close(weight, runs[1][1][name], atol=1e-4, rtol=1e-4)


def test_pretrain_on_pairs_lowers_held_out_lm_loss(tiny_model, tiny_tokenizer):
    from gram_core.encoding import PretrainEncoder, encode_unlabeled_pairs
    from gram_core.plans import as_unlabeled

    encoder = PretrainEncoder(tiny_tokenizer, 256)
    held_out, _ = encode_unlabeled_pairs(encoder, as_unlabeled(toy_pairs(16, seed=5)))
    before = held_out_loss(tiny_model, tiny_tokenizer, held_out)
    config = TrainConfig(learning_rate=3e-3, batch_size=8, epochs=2, warmup_ratio=0.1)
    result = train_pretrain(tiny_model, tiny_tokenizer, toy_pairs(64, seed=4), config, EncodeConfig(max_length=512))
    after = held_out_loss(tiny_model, tiny_tokenizer, held_out)
    assert result.steps == 16 and result.data_stats["examples"] == 64
    assert after < before - 1.0, (before, after)


def test_bf16_autocast_is_applied_and_trains(tiny_tokenizer):
    examples = lm_examples(tiny_tokenizer, 8)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        runs[precision] = fit(model, tiny_tokenizer, examples, max_steps=2, precision=precision).history
    fp32, bf16 = runs["fp32"][0]["train/loss"], runs["bf16"][0]["train/loss"]
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.02)  # same model, bf16 matmuls: close, not equal
    assert all(np.isfinite(h["train/grad_norm"]) and h["train/grad_norm"] > 0 for h in runs["bf16"])


def test_slot_placement_is_redrawn_each_epoch_and_seeded():
    from gram_core.batching import DataOrder, Groups

    groups = Groups(tuple((2 * i, 2 * i + 1) for i in range(40)), pick="half")
    lengths = [10] * 80

    def placement(seed, epoch):
        order = DataOrder(lengths, 8, seed, groups)
        picked = [i for step in range(epoch * order.steps_per_epoch, (epoch + 1) * order.steps_per_epoch)
                  for i in order.batch(step)]
        assert sorted(i // 2 for i in picked) == list(range(40))  # every pair exactly once per epoch
        return {i // 2: i % 2 for i in picked}  # pair -> 0 (chosen in A) / 1 (chosen in B)

    first = placement(0, 0)
    assert sum(v == 0 for v in first.values()) == 20  # exactly half the pairs have the chosen response in A
    assert placement(0, 0) == first  # a pure function of (seed, epoch): resume sees the same slots
    assert placement(0, 1) != first  # redrawn each epoch
    assert placement(1, 0) != first  # and by seed


def test_both_orders_of_a_pair_share_a_batch():
    from gram_core.batching import DataOrder, Groups

    groups = Groups(tuple((2 * i, 2 * i + 1) for i in range(30)), pick="all")
    order = DataOrder(list(np.random.default_rng(0).integers(5, 50, 60)), 8, 3, groups)
    assert order.steps_per_epoch == 8  # 4 pairs (8 sequences) per batch
    for step in range(order.steps_per_epoch):
        batch = order.batch(step)
        assert all(i + 1 in batch for i in batch if i % 2 == 0) and all(i - 1 in batch for i in batch if i % 2)


def test_final_norm_and_verdict_rows_get_their_own_learning_rates(tiny_tokenizer):
    from gram_core.param_groups import final_norm_params, param_groups, verdict_row_params

    model = apply_trainable(build_tiny_model(tiny_tokenizer, seed=0),
                            ModelConfig(freeze_layers=1, untie_verdict_rows=True))
    norm, (head,) = final_norm_params(model), verdict_row_params(model)
    assert norm == [model.model.norm.weight] and head is model.lm_head.weight
    assert head is not model.model.embed_tokens.weight and torch.equal(head, model.model.embed_tokens.weight)
    params = [p for p in model.parameters() if p.requires_grad]
    config = TrainConfig(learning_rate=1e-3, final_norm_lr_multiplier=30.0, verdict_lr_multiplier=0.5)
    lr = {id(p): g["lr"] for g in param_groups(model, params, config) for p in g["params"]}
    assert lr[id(norm[0])] == pytest.approx(3e-2) and lr[id(head)] == pytest.approx(5e-4)
    assert {lr[id(p)] for p in params if p is not head and p is not norm[0]} == {1e-3}
    assert sum(len(g["params"]) for g in param_groups(model, params, config)) == len(params)
    # Tied (the default), there are no verdict rows to train: the head is the frozen embedding.
    tied = apply_trainable(build_tiny_model(tiny_tokenizer, seed=0), ModelConfig(freeze_layers=1))
    assert verdict_row_params(tied) == []


def test_untied_verdict_rows_start_equal_and_only_they_move(tiny_tokenizer):
    """Untying changes no output; a stage-2 step then moves the verdict rows of the head and no other row."""
    base = build_tiny_model(tiny_tokenizer, seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = apply_trainable(base, ModelConfig(untie_verdict_rows=True))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    head = model.lm_head.weight.detach().clone()
    config = TrainConfig(learning_rate=1e-2, batch_size=4, max_steps=2, warmup_ratio=0.0)
    train_judge(model, tiny_tokenizer, toy_pairs(4, seed=3), config, EncodeConfig(max_length=512, order="both"))
    changed = (model.lm_head.weight.detach() != head).any(dim=1).nonzero().flatten().tolist()
    from gram_core.encoding import JudgeEncoder

    assert sorted(changed) == sorted(JudgeEncoder(tiny_tokenizer, 512, "A", "B").label_ids)


@pytest.mark.parametrize("name, files", [
    ("pretrain", {"config.json"}),
    ("finetune", {"config.json", "gram_judge.json"}),
    ("bradley_terry", {"config.json", "reward_head.safetensors"}),
])
def test_each_training_stage_is_one_row_of_the_table(tiny_tokenizer, tmp_path, name, files):
    from gram_core.stages import TRAINING_STAGES, training_stage

    stage = training_stage(name)
    assert TRAINING_STAGES[name] is stage and stage.name == name
    model = build_tiny_model(tiny_tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(learning_rate=1e-2, batch_size=4, max_steps=2, warmup_ratio=0.0)
    trained, result = stage.train(model, tiny_tokenizer, toy_pairs(8, seed=3), config, EncodeConfig(max_length=512))
    assert result.steps == 2 and all(np.isfinite(m["train/loss"]) for m in result.history)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    stage.save(trained, tiny_tokenizer, EncodeConfig(max_length=512), tmp_path / name, None)
    assert files <= {p.name for p in (tmp_path / name).iterdir()}


def test_an_unknown_training_stage_names_the_known_ones():
    from gram_core.stages import training_stage

    with pytest.raises(ValueError, match=r"unknown training stage 'judge'.*'pretrain', 'finetune', 'bradley_terry'"):
        training_stage("judge")


def test_adam_beta2_reaches_the_optimizer_and_is_checked(tiny_tokenizer, monkeypatch):
    """train.adam_beta2 is AdamW's second-moment decay (docs/stage2.md); out of (0, 1) is a config error."""
    from gram_core.config import ConfigError

    seen, real = [], torch.optim.AdamW

    def spy(*args, **kwargs):
        seen.append(kwargs.get("betas"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model = apply_trainable(build_tiny_model(tiny_tokenizer, seed=0), ModelConfig(freeze_layers=1))
    config = TrainConfig(learning_rate=1e-3, batch_size=4, max_steps=1, warmup_ratio=0.0, adam_beta2=0.95)
    train_judge(model, tiny_tokenizer, toy_pairs(4, seed=3), config, EncodeConfig(max_length=512, order="both"))
    assert seen == [(0.9, 0.95)]
    with pytest.raises(ConfigError, match="adam_beta2"):
        TrainConfig(adam_beta2=1.0)
