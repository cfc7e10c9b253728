"""Sharded training (FSDP2 over gloo, 2 CPU processes) matches unsharded training step for step, resumes
exactly from its own checkpoints and saves the full model; activation checkpointing changes no number."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from toy_data import better_pairs as toy_pairs

from gram_core.baseline import BTScorer, train_bradley_terry
from gram_core.config import ConfigError, EncodeConfig, ModelConfig, TrainConfig, from_dict
from gram_core.models import apply_trainable, build_tiny_model, build_tiny_tokenizer, save_model
from gram_core.plans import train_judge, train_pretrain
from gram_core.sharding import full_state_dict
from gram_core.steps import judge_step_fn
from tasks.settings import load_preset

ENCODE = EncodeConfig(max_length=512, order="random_half")


def judge_config(**overrides):
    """3 steps of global batch 2 workers x 2 x 2 over 13 pairs: step 2 holds 5 (shards of 2 and 3, so one rank
    runs a padding micro-batch under fsdp); a checkpoint at step 2."""
    return TrainConfig(**{"learning_rate": 1e-3, "max_steps": 3, "batch_size": 2, "grad_accum_steps": 2,
                          "warmup_ratio": 0.0, "checkpoint_every_steps": 2, "reuse_prefix": False, **overrides})


def losses(result):
    return [m["train/loss"] for m in result.history]


def full_weights(model):
    state = full_state_dict(model)  # every rank takes part; None when not sharded
    return {k: v.clone() for k, v in (model.state_dict() if state is None else state).items()}


def two_rank_worker(rank, folder):
    """Both ranks run every scenario; rank 0 saves what the tests compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        tokenizer = build_tiny_tokenizer()
        rows, out = toy_pairs(13, seed=1), {}
        for sharding in ("none", "fsdp"):
            model = build_tiny_model(tokenizer, seed=0)
            result = train_judge(model, tokenizer, rows, judge_config(sharding=sharding), ENCODE,
                                 output_dir=f"{folder}/judge-{sharding}")
            out[f"judge-{sharding}"] = (losses(result), full_weights(model))
            if sharding == "fsdp":
                state = full_state_dict(model)
                if rank == 0:
                    save_model(model, tokenizer, f"{folder}/saved-fsdp", state_dict=state)
        model = build_tiny_model(tokenizer, seed=0)  # bf16 compute over fp32 shards
        config = judge_config(sharding="fsdp", precision="bf16", max_steps=2, checkpoint_every_steps=0)
        out["judge-fsdp-bf16"] = (losses(train_judge(model, tokenizer, rows, config, ENCODE)), full_weights(model))
        model = build_tiny_model(tokenizer, seed=0)  # resume the fsdp run from its step-2 checkpoint
        result = train_judge(model, tokenizer, rows, judge_config(sharding="fsdp"), ENCODE,
                             output_dir=f"{folder}/judge-resumed", resume_from=f"{folder}/judge-fsdp/checkpoint-2")
        out["judge-resumed"] = (losses(result), full_weights(model))
        for sharding, checkpointing in (("none", False), ("fsdp", True)):  # stage 1, lowest layer frozen
            model = apply_trainable(build_tiny_model(tokenizer, seed=0, layers=3), ModelConfig(freeze_layers=1))
            config = judge_config(sharding=sharding, activation_checkpointing=checkpointing, checkpoint_every_steps=0)
            result = train_pretrain(model, tokenizer, rows, config, ENCODE)
            out[f"frozen-{sharding}"] = (losses(result), full_weights(model))
        for sharding in ("none", "fsdp"):  # the Bradley-Terry baseline: a reward head in the FSDP root
            model = build_tiny_model(tokenizer, seed=0)
            config = judge_config(sharding=sharding, checkpoint_every_steps=0, max_steps=2)
            reward_model, result = train_bradley_terry(model, tokenizer, rows, config, ENCODE)
            out[f"bt-{sharding}"] = (losses(result), full_weights(reward_model))
        state = full_state_dict(reward_model)
        if rank == 0:
            BTScorer(reward_model, tokenizer, ENCODE.max_length).save(f"{folder}/saved-bt", state_dict=state)
            torch.save(out, f"{folder}/results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharding")
    # fork: the children reuse the imported modules (spawn would re-import transformers: ~10 s)
    mp.start_processes(two_rank_worker, args=(str(folder),), nprocs=2, start_method="fork")
    return folder, torch.load(folder / "results.pt", weights_only=False)


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_fsdp_matches_unsharded_training(two_ranks):
    _, out = two_ranks
    (plain, plain_weights), (fsdp, fsdp_weights) = out["judge-none"], out["judge-fsdp"]
    assert len(plain) == 3 and np.allclose(fsdp, plain, rtol=0, atol=1e-5), (fsdp, plain)
    assert_same_weights(fsdp_weights, plain_weights)
    start = build_tiny_model(build_tiny_tokenizer(), seed=0).state_dict()
    assert all(not torch.equal(start[k], plain_weights[k]) for k in start)  # training moved every tensor


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_master_weights(two_ranks):
    _, out = two_ranks
    (plain, _), (bf16, bf16_weights) = out["judge-none"], out["judge-fsdp-bf16"]
    assert bf16 != plain[:2] and np.allclose(bf16, plain[:2], rtol=0, atol=1e-3)  # bf16 rounding, no more
    assert all(w.dtype == torch.float32 for w in bf16_weights.values())
    start = build_tiny_model(build_tiny_tokenizer(), seed=0).state_dict()
    assert all(not torch.equal(start[k], bf16_weights[k]) for k in start)


def test_fsdp_resumes_from_its_checkpoint_and_saves_the_full_model(two_ranks):
    from transformers import AutoModelForCausalLM

    folder, out = two_ranks
    (straight, weights), (resumed, resumed_weights) = out["judge-fsdp"], out["judge-resumed"]
    assert resumed[:2] == straight[:2]  # steps 1-2 come from the checkpoint's history
    assert resumed[2] == pytest.approx(straight[2], abs=1e-6)
    assert_same_weights(resumed_weights, weights, atol=1e-6)
    saved = AutoModelForCausalLM.from_pretrained(folder / "saved-fsdp").state_dict()
    assert_same_weights(saved, weights, atol=0)


def test_fsdp_with_frozen_layers_and_activation_checkpointing(two_ranks):
    _, out = two_ranks
    (plain, plain_weights), (fsdp, fsdp_weights) = out["frozen-none"], out["frozen-fsdp"]
    assert np.allclose(fsdp, plain, rtol=0, atol=1e-5), (fsdp, plain)
    assert_same_weights(fsdp_weights, plain_weights)
    start = build_tiny_model(build_tiny_tokenizer(), seed=0, layers=3).state_dict()
    frozen = [k for k in start if k.startswith(("model.embed_tokens", "model.layers.0.", "lm_head"))]
    assert frozen and all(torch.equal(start[k], fsdp_weights[k]) for k in frozen)
    assert all(not torch.equal(start[k], fsdp_weights[k]) for k in start if k not in frozen)


def test_fsdp_bradley_terry_matches_unsharded_and_saves_its_head(two_ranks):
    folder, out = two_ranks
    (plain, plain_weights), (fsdp, fsdp_weights) = out["bt-none"], out["bt-fsdp"]
    assert np.allclose(fsdp, plain, rtol=0, atol=1e-5), (fsdp, plain)
    # The head's bias cancels in r_chosen - r_rejected: its gradient is rounding noise, which Adam scales up.
    assert_same_weights(*({k: v for k, v in w.items() if k != "head.bias"} for w in (fsdp_weights, plain_weights)))
    saved = BTScorer.load(folder / "saved-bt").model.state_dict()
    assert_same_weights(saved, fsdp_weights, atol=0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_tokenizer, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    from gram_core.encoding import JudgeEncoder
    from gram_core.sharding import set_activation_checkpointing
    from gram_core.steps import collate_judge

    calls, mlp_forward = [], LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))
    encoder = JudgeEncoder(tiny_tokenizer, 512)
    step = judge_step_fn(encoder.label_ids, encoder.prefix_ids, 0.1, reuse_prefix=False)
    batch = collate_judge(tiny_tokenizer.pad_token_id, encoder.prefix_ids)(
        [{"suffix_ids": encoder.encode(r["prompt"], r["chosen"], r["rejected"]).suffix_ids, "label": 0}
         for r in toy_pairs(3, seed=2)])
    results = {}
    for checkpointing in (False, True):
        model = build_tiny_model(tiny_tokenizer, seed=0).train()
        set_activation_checkpointing(model, checkpointing)
        calls.clear()
        loss, _ = step(model, batch)
        loss.backward()
        results[checkpointing] = (loss.item(), {n: p.grad for n, p in model.named_parameters()}, len(calls))
    (loss, grads, runs), (loss_ac, grads_ac, runs_ac) = results[False], results[True]
    assert runs_ac == 2 * runs == 4  # each layer ran again in backward
    assert loss_ac == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(grads_ac[n], grads[n], rtol=0, atol=1e-6) for n in grads)


def test_prefix_reuse_is_off_under_checkpointing_or_fsdp_with_a_warning(tiny_tokenizer, caplog):
    assert TrainConfig().prefix_reuse
    assert not TrainConfig(sharding="fsdp").prefix_reuse and not TrainConfig(activation_checkpointing=True).prefix_reuse
    rows, results = toy_pairs(4, seed=3), {}
    for reuse in (True, False):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        config = TrainConfig(max_steps=2, batch_size=4, reuse_prefix=reuse, activation_checkpointing=True)
        results[reuse] = losses(train_judge(model, tiny_tokenizer, rows, config, ENCODE))
    assert results[True] == results[False]
    assert "reuse_prefix is off" in caplog.text


def test_fsdp_with_one_process_is_plain_training(tiny_tokenizer):
    rows, results = toy_pairs(6, seed=4), {}
    for sharding in ("none", "fsdp"):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        config = TrainConfig(learning_rate=1e-3, max_steps=2, batch_size=4, reuse_prefix=False, sharding=sharding)
        results[sharding] = (losses(train_judge(model, tiny_tokenizer, rows, config, ENCODE)), model.state_dict())
    assert results["fsdp"][0] == results["none"][0]
    assert all(torch.equal(results["fsdp"][1][k], v) for k, v in results["none"][1].items())


def test_bad_sharding_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"train.sharding: expected one of \['none', 'fsdp'\], got 'zero3'"):
        from_dict(TrainConfig, {"sharding": "zero3"})
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*expected bool"):
        from_dict(TrainConfig, {"activation_checkpointing": "yes"}, where="train")
    with pytest.raises(ConfigError, match="finetune.sharding: 'fsdp' does not support LoRA"):
        load_preset("smoke", ["finetune.sharding=fsdp", "model.lora_r=4"])
