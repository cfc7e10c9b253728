"""Step functions and collators of the two GRAM stages: a batch of encoded examples -> (loss, metrics).

``step_fn(model, batch) -> (loss, metrics)`` returns the micro-batch's mean loss and mean metrics;
``collate(examples) -> batch`` builds the tensors it reads (an optional ``"weight"`` entry sets the batch's
share of the step's mean loss). ``gram_core.training.train`` runs any such pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gram_core.batching import pad_right
from gram_core.forward import StepPrefix, answer_logits
from gram_core.losses import IGNORE_INDEX, judge_loss
from gram_core.shared_forward import SharedJudgeForward

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
Collate = Callable[[list[dict]], dict]


def collate_judge(pad_id: int, prefix_ids: Sequence[int] | None = None) -> Collate:
    """Right-padded suffixes (or full ids when ``prefix_ids`` is given: no prefix reuse) + verdict labels."""
    prefix = list(prefix_ids or [])

    def collate(examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_right([prefix + list(ex["suffix_ids"]) for ex in examples], pad_id)
        labels = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def judge_step_fn(label_ids: Sequence[int], prefix_ids: Sequence[int], smoothing: float,
                  reuse_prefix: bool = True) -> StepFn:
    """Stage 2: answer-position logits of (A, B) -> smoothed two-way CE; metrics accuracy and mean margin.

    With ``reuse_prefix`` the batch holds suffixes and the shared prefix runs with grad once per optimizer
    step inside ``train`` (the step function's ``step_prefix``, a ``StepPrefix``), or once per call when the
    step function is called on its own; without it the batch holds full ids (see ``collate_judge(pad_id,
    prefix_ids)``).
    """
    label_ids, prefix = list(label_ids), list(prefix_ids)
    shared = StepPrefix(prefix) if reuse_prefix else None

    def step(model, batch: dict) -> tuple[torch.Tensor, dict]:
        reused = (shared.cache() if shared.active else prefix) if shared is not None else None
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], label_ids, prefix=reused)
        return _judge_loss_metrics(logits, batch["labels"], smoothing)

    step.step_prefix = shared
    return step


def shared_judge_step_fn(label_ids: Sequence[int], prefix_ids: Sequence[int], smoothing: float,
                         cache_bytes: int = 0) -> StepFn:
    """Stage 2 as ``judge_step_fn``, on batches of ``shared_forward.collate_shared_judge``: each pair's common
    prefix runs once for both slot orders, the frozen layers once per run (``cache_bytes`` of their outputs
    kept), the last layer at the verdict position only. Same loss and gradients (shared_forward)."""
    forward = SharedJudgeForward(prefix_ids, label_ids, cache_bytes)

    def step(model, batch: dict) -> tuple[torch.Tensor, dict]:
        return _judge_loss_metrics(forward.logits(model, batch), batch["labels"], smoothing)

    step.step_prefix = forward
    return step


def _judge_loss_metrics(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, dict]:
    """Smoothed two-way CE over (z_A, z_B); metrics accuracy and mean margin."""
    loss = judge_loss(logits, labels, smoothing)
    with torch.no_grad():
        # margin = z_correct - z_other (the Delta of METHOD.md section 3; optimum log((2-eps)/eps)).
        sign = 1.0 - 2.0 * labels.float()
        margin = (logits[:, 0] - logits[:, 1]).float() * sign
    return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}


def collate_pretrain(pad_id: int) -> Collate:
    """Right-padded ids with -100 labels on padding; weight = target tokens (token-weighted accumulation)."""

    def collate(examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_right([ex["input_ids"] for ex in examples], pad_id)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, ex in enumerate(examples):
            labels[row, :len(ex["labels"])] = torch.as_tensor(ex["labels"], dtype=torch.long)
        weight = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weight": weight}

    return collate


def pretrain_step_fn() -> StepFn:
    """Stage 1: next-token CE on the target tokens, computing vocabulary logits only where labels count."""

    def step(model, batch: dict) -> tuple[torch.Tensor, dict]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA is injected in place
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        # = losses.lm_loss(full logits, labels) (shifted CE, -100 ignored) without the [B, T, V] tensor.
        loss = F.cross_entropy(logits.float(), targets[keep])
        return loss, {}

    return step
