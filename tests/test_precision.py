"""Mixed precision: fp32 master weights under bf16 autocast move every trainable parameter at the paper
preset's learning rates; bf16 parameters are refused unless opted into (and then most updates vanish)."""

import dataclasses

import pytest
import torch
from toy_data import better_pairs as toy_pairs

from gram_core.config import EncodeConfig
from gram_core.models import build_tiny_model
from gram_core.plans import train_judge, train_pretrain
from gram_core.precision import LowPrecisionParamsError, check_master_weights, inference_dtype
from tasks.settings import load_preset


def paper_stage(stage, **overrides):
    """The paper preset's stage config, shrunk to 3 steps of 4 pairs (warm-up: step 1 has lr 0)."""
    config = load_preset("paper")
    train = config.pretrain.train_config() if stage == "pretrain" else config.finetune
    return config, dataclasses.replace(train, max_steps=3, batch_size=4, grad_accum_steps=1,
                                       checkpoint_every_steps=0, **overrides)


def changed(model, before):
    return {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_paper_preset_moves_every_trainable_parameter(tiny_tokenizer, stage):
    config, train = paper_stage(stage)
    assert train.precision == "bf16" and train.learning_rate <= 2e-5
    model = build_tiny_model(tiny_tokenizer, seed=0).to(getattr(torch, config.model.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = train_pretrain if stage == "pretrain" else train_judge
    result = run(model, tiny_tokenizer, toy_pairs(12, seed=1), train, EncodeConfig(max_length=512))
    assert result.steps == 3 and all(p.dtype == torch.float32 for p in model.parameters())  # fp32 masters
    moved = changed(model, before)
    assert all(moved.values()), [n for n, m in moved.items() if not m]


def test_bf16_parameters_are_refused_with_the_fix_named(tiny_tokenizer):
    _, train = paper_stage("finetune")
    model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16)
    with pytest.raises(LowPrecisionParamsError, match="model.dtype float32.*precision bf16"):
        train_judge(model, tiny_tokenizer, toy_pairs(4, seed=1), train, EncodeConfig(max_length=512))


def test_opting_into_bf16_parameters_loses_most_updates(tiny_tokenizer):
    """Why the guard exists: stepped directly, bf16 weights mostly round the paper-lr updates away."""
    _, train = paper_stage("finetune", allow_low_precision_params=True)
    model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_judge(model, tiny_tokenizer, toy_pairs(12, seed=1), train, EncodeConfig(max_length=512))
    moved = changed(model, before)
    norms = [n for n in moved if n.endswith("norm.weight")]
    assert norms and not any(moved[n] for n in norms)  # w = 1: half an ulp is 2e-3, 100x the step
    fraction = torch.cat([(p.detach() != before[n]).flatten() for n, p in model.named_parameters()]).float().mean()
    assert fraction < 0.5


def test_check_master_weights_accepts_fp32_and_frozen_bf16():
    fp32 = torch.nn.Parameter(torch.zeros(2))
    check_master_weights([("w", fp32)], allow_low_precision=False)
    check_master_weights([("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)))], allow_low_precision=True)
    with pytest.raises(LowPrecisionParamsError, match="float16"):
        check_master_weights([("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)))], False)


def test_inference_dtype_is_bf16_on_gpu_only():
    assert inference_dtype("auto", "cuda") == "bfloat16" and inference_dtype("auto", "cpu") == "float32"
    assert inference_dtype("float16", "cuda") == "float16"
