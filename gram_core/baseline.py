"""The discriminative baseline: a Bradley-Terry reward model on the same base model and data path.

r(x, y) = w · h_last + b, where h_last is the final hidden state at the last real token of the chat
"user: x, assistant: y" (no value head exists in the base model, so the head is new and seeded). Training
minimises the Bradley-Terry loss -log σ(r(x, y_chosen) − r(x, y_rejected)) with the same ``train`` loop as
GRAM; a pair's preference is P(y1 ≻ y2) = σ(r1 − r2), which does not depend on slot order.

As the pipeline's baseline it is trained from the base model (not from stage 1) with the same model settings
and the same number of optimizer steps as stage 2; ``bt_train_config`` states the matching rule.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gram_core.batching import length_grouped_batches, pad_right, preference_groups, total_steps
from gram_core.config import EncodeConfig, TrainConfig
from gram_core.encoding import (
    DEFAULT_RESPONSE_FLOOR,
    keep_ends,
    plan_truncation,
    split_chat_template,
    tokenize,
)
from gram_core.judging import PairScores, Reporter
from gram_core.losses import bradley_terry_loss
from gram_core.models import load_tokenizer, save_model
from gram_core.plans import Plan, frozen_cache_bytes, run_plan
from gram_core.shared_forward import SharedJudgeForward, collate_shared_judge, supports
from gram_core.training import TrainResult

HEAD_FILE = "reward_head.safetensors"
HEAD_META = "reward_head.json"


class RewardEncoder:
    """Token ids of the chat (user = prompt, assistant = response), shortened to ``max_length`` as in
    encoding.plan_truncation (response first down to a floor, then the prompt)."""

    def __init__(self, tokenizer, max_length: int = 1024, response_floor: int = DEFAULT_RESPONSE_FLOOR,
                 system_prompt: str | None = None):
        head, middle, tail = split_chat_template(tokenizer, ["user", "assistant"], add_generation_prompt=False,
                                                 system_prompt=system_prompt)
        self.tokenizer, self.max_length, self.response_floor = tokenizer, max_length, response_floor
        self.head_ids, self.middle_ids, self.tail_ids = (tokenize(tokenizer, t) for t in (head, middle, tail))

    def encode(self, prompt: str, response: str, pair_id=None) -> list[int]:
        p, r = tokenize(self.tokenizer, prompt), tokenize(self.tokenizer, response)
        budget = self.max_length - len(self.head_ids) - len(self.middle_ids) - len(self.tail_ids)
        try:
            kept_p, kept_r, _ = plan_truncation(len(p), len(r), 0, budget, self.response_floor)
        except ValueError as err:
            raise ValueError(f"pair {pair_id!r}: the chat template alone exceeds max_length={self.max_length}") from err
        return self.head_ids + keep_ends(p, kept_p) + self.middle_ids + r[:kept_r] + self.tail_ids


class RewardModel(torch.nn.Module):
    """A causal LM's decoder with a scalar head on the last real token's final hidden state."""

    def __init__(self, base: torch.nn.Module, seed: int = 0):
        super().__init__()
        self.base = base
        hidden = self._inner().config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # small seeded init: rewards start near 0, so σ(r1 − r2) starts near 0.5
            self.head.weight.copy_(torch.randn(1, hidden, generator=generator) / hidden)
            self.head.bias.zero_()
        self.head.to(next(base.parameters()).device)

    def _inner(self):
        return self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base  # peft

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B] of right-padded sequences."""
        hidden = self._inner().get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                             use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.float()).squeeze(-1)  # head in fp32 even under bf16 weights


def collate_bt(pad_id: int):
    """Chosen sequences then rejected ones in one padded batch [2B, T]."""

    def collate(examples: list[dict]) -> dict:
        seqs = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
        input_ids, attention_mask = pad_right(seqs, pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return collate


def bt_step_fn():
    """Bradley-Terry loss on a collate_bt batch; metrics: pairwise accuracy and mean reward margin."""

    def step(model: RewardModel, batch: dict) -> tuple[torch.Tensor, dict]:
        rewards = model(batch["input_ids"], batch["attention_mask"])
        r_chosen, r_rejected = rewards.chunk(2)
        margin = (r_chosen - r_rejected).detach()
        return bradley_terry_loss(r_chosen, r_rejected), {"accuracy": (margin > 0).float().mean(),
                                                          "margin": margin.mean()}

    return step


def collate_shared_bt(pad_id: int, preamble_length: int):
    """A BT micro-batch for ``shared_forward``: each pair's chosen then rejected sequence (the template head cut
    off: it is the preamble), grouped by pair, so the prompt they share runs once."""
    inner = collate_shared_judge(pad_id)

    def collate(examples: list[dict]) -> dict:
        return inner([{"pair_id": ("pair", index), "suffix_ids": ex[key][preamble_length:]}
                      for index, ex in enumerate(examples) for key in ("chosen_ids", "rejected_ids")])

    return collate


def shared_bt_step_fn(preamble_ids: Sequence[int], cache_bytes: int = 0):
    """``bt_step_fn`` on ``collate_shared_bt`` batches: the rewards from ``shared_forward`` (the shared prompt once
    per pair, the frozen layers without grad, the last layer at the last token only); same loss and gradients."""
    forward = SharedJudgeForward(preamble_ids, cache_bytes=cache_bytes, lm_of=lambda model: model.base)

    def step(model: RewardModel, batch: dict) -> tuple[torch.Tensor, dict]:
        rewards = model.head(forward.hidden(model, batch).float()).squeeze(-1)
        r_chosen, r_rejected = rewards[0::2], rewards[1::2]
        margin = (r_chosen - r_rejected).detach()
        return bradley_terry_loss(r_chosen, r_rejected), {"accuracy": (margin > 0).float().mean(),
                                                          "margin": margin.mean()}

    step.step_prefix = forward
    return step


def encode_bt_pairs(encoder: RewardEncoder, rows: Iterable[dict]) -> list[dict]:
    examples = []
    for index, row in enumerate(rows):
        missing = [k for k in ("pair_id", "prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise KeyError(f"row {index} lacks column(s) {missing}; expected pair_id, prompt, chosen, rejected")
        examples.append({"pair_id": row["pair_id"],
                         "chosen_ids": encoder.encode(row["prompt"], row["chosen"], row["pair_id"]),
                         "rejected_ids": encoder.encode(row["prompt"], row["rejected"], row["pair_id"])})
    return examples


def bt_train_config(finetune: TrainConfig, encode: EncodeConfig, num_pairs: int, world: int = 1) -> TrainConfig:
    """The BT run matched to a stage-2 run of ``finetune`` on the same ``num_pairs`` pairs and ``world`` workers.

    Same optimizer steps: ``max_steps`` = stage 2's step count (training.total_steps over the pairs in both
    orders, grouped as ``encode.order`` says: 'both' puts a pair's two orders in one batch, so batch_size
    sequences are batch_size/2 pairs; 'random_half' uses one order per pair per epoch). Same sequences per
    micro-batch: a BT example is two sequences (chosen and rejected), so BT's ``batch_size`` is
    max(1, finetune.batch_size // 2) pairs. Everything else (learning rate, schedule, accumulation,
    precision, seed) is ``finetune``'s. With order 'both' BT thus sees every pair as often as stage 2 does;
    with 'random_half' stage 2 takes twice as many pairs per step, so BT covers half as many epochs.
    """
    if num_pairs < 1:
        raise ValueError(f"bt_train_config: num_pairs must be >= 1, got {num_pairs}")
    steps = total_steps(2 * num_pairs, finetune, world, preference_groups(num_pairs, encode.order))
    return dataclasses.replace(finetune, batch_size=max(1, finetune.batch_size // 2), max_steps=steps)


def plan_bradley_terry(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig,
                       *, head_seed: int = 0) -> Plan:
    """Wrap ``model`` (a causal LM, maybe LoRA/frozen) with a seeded head; encode preference rows as BT pairs."""
    reward_model = RewardModel(model, seed=head_seed)
    encoder = RewardEncoder(tokenizer, encode_cfg.max_length, system_prompt=encode_cfg.system_prompt)
    examples = encode_bt_pairs(encoder, rows)
    lengths = [len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples]
    if train_cfg.prefix_reuse and train_cfg.shared_segments and encoder.head_ids and supports(model):
        step_fn = shared_bt_step_fn(encoder.head_ids, frozen_cache_bytes(train_cfg, lengths))
        return Plan(reward_model, examples, step_fn, collate_shared_bt(tokenizer.pad_token_id, len(encoder.head_ids)),
                    lengths)
    return Plan(reward_model, examples, bt_step_fn(), collate_bt(tokenizer.pad_token_id), lengths)


def train_bradley_terry(model, tokenizer, rows: Iterable[dict], train_cfg: TrainConfig, encode_cfg: EncodeConfig,
                        *, head_seed: int = 0, **kwargs) -> tuple[RewardModel, TrainResult]:
    """Train the reward model of ``plan_bradley_terry``; returns it with the result (``kwargs`` go to ``train``)."""
    plan = plan_bradley_terry(model, tokenizer, rows, train_cfg, encode_cfg, head_seed=head_seed)
    return plan.model, run_plan(plan, train_cfg, **kwargs)


class BTScorer:
    """Score pairs with a trained RewardModel: P(y1 ≻ y2) = σ(r1 − r2), the same in both slot orders."""

    def __init__(self, reward_model: RewardModel, tokenizer, max_length: int = 1024, batch_size: int = 8,
                 system_prompt: str | None = None):
        self.model, self.tokenizer, self.batch_size = reward_model, tokenizer, batch_size
        self.system_prompt = system_prompt
        self.encoder = RewardEncoder(tokenizer, max_length, system_prompt=system_prompt)

    def rewards(self, prompts: Sequence[str], responses: Sequence[str], reporter: Reporter | None = None) -> np.ndarray:
        """r(x, y) per row (float64), in row order; batches are length-grouped to limit padding. ``reporter``
        hears of each batch's sequences (a progress bar or callback)."""
        if len(prompts) != len(responses):
            raise ValueError(f"BTScorer.rewards: {len(prompts)} prompts but {len(responses)} responses")
        seqs = [self.encoder.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = np.zeros(len(seqs))
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in length_grouped_batches([len(s) for s in seqs], self.batch_size, shuffle=False):
                    ids, mask = pad_right([seqs[i] for i in batch], self.tokenizer.pad_token_id)
                    out[batch] = self.model(ids.to(device), mask.to(device)).double().cpu().numpy()
                    if reporter is not None:
                        reporter.update(len(batch))
        finally:
            self.model.train(was_training)
        return out

    def preference(self, prompts: Sequence[str], responses_1: Sequence[str], responses_2: Sequence[str],
                   progress=None, ids=None):
        """P(y1 ≻ y2) = σ(r1 − r2) as PairScores (both "orders" equal: a scalar model has no slots): how
        ``reward_scoring.pairwise`` reads a BTScorer, so every operation and ``scorers.score_table`` take one."""
        reporter = Reporter(progress, 2 * len(prompts), "scoring")  # progress(done, total) per batch, or a bar
        try:
            r1 = self.rewards(list(prompts), list(responses_1), reporter)
            r2 = self.rewards(list(prompts), list(responses_2), reporter)
        finally:
            reporter.close()
        p = 1.0 / (1.0 + np.exp(-(r1 - r2)))
        return PairScores(p_order1=p, p_order2=p, p=p)

    def save(self, folder: str | Path, state_dict: dict | None = None) -> Path:
        """A plain HF folder of the base model (LoRA merged — in place) plus the head weights beside it.

        ``state_dict``: the reward model's full weights to write instead of its own (a sharded model's)."""
        base = head = None
        if state_dict is not None:
            base = {k.removeprefix("base."): v for k, v in state_dict.items() if k.startswith("base.")}
            head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
        folder = save_model(self.model.base, self.tokenizer, Path(folder), state_dict=base)
        head = head if head is not None else self.model.head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(folder / HEAD_FILE))
        (folder / HEAD_META).write_text(json.dumps({"kind": "bradley_terry", "max_length": self.encoder.max_length,
                                                    "hidden_size": self.model.head.in_features,
                                                    "system_prompt": self.system_prompt}))
        return folder

    @classmethod
    def load(cls, folder: str | Path, batch_size: int = 8, device: str | None = None) -> BTScorer:
        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {HEAD_FILE}: not a Bradley-Terry reward model folder")
        meta = json.loads((folder / HEAD_META).read_text())
        base = AutoModelForCausalLM.from_pretrained(folder)
        reward_model = RewardModel(base)
        reward_model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        if device:
            reward_model.to(device)
        return cls(reward_model, load_tokenizer(str(folder)), meta["max_length"], batch_size,
                   system_prompt=meta.get("system_prompt"))

