"""The GRAM losses as tensor-only functions (METHOD.md sections 2 and 3), each with its equation.

Every function takes plain tensors and returns a scalar tensor, so each is testable on hand-made values.
Losses are computed in float32 whatever the logits' dtype (bf16 log-softmax loses the small margins).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def judge_loss(logits_ab: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Stage-2 loss: two-way cross-entropy with label smoothing over (z_A, z_B), mean over the batch.

    logits_ab: [B, 2] answer-position logits of the label tokens "A" and "B"; labels: [B] (0 = A wins,
    1 = B wins); smoothing: epsilon in [0, 1).
    """
    if logits_ab.dim() != 2 or logits_ab.shape[1] != 2:
        raise ValueError(f"judge_loss: logits_ab must have shape [B, 2], got {tuple(logits_ab.shape)}")
    if labels.shape != logits_ab.shape[:1]:
        raise ValueError(f"judge_loss: labels must have shape [{logits_ab.shape[0]}], got {tuple(labels.shape)}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"judge_loss: smoothing must be in [0, 1), got {smoothing}")
    # L = -sum_k q_k log softmax(z)_k with q = (1 - eps/2) on the label, eps/2 on the other class (PyTorch's
    # convention: q = (1 - eps) * onehot + eps / K, K = 2). Equivalently L = -log sigma(D) + (eps/2) * D,
    # D = z_chosen - z_rejected: Bradley-Terry plus a linear margin penalty (METHOD.md section 3).
    return F.cross_entropy(logits_ab.float(), labels.long(), label_smoothing=smoothing)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Stage-1 loss: shifted next-token cross-entropy, positions labelled -100 ignored.

    logits: [B, T, V]; labels: [B, T] aligned with the input ids (the shift happens here).
    reduction: "mean" over target tokens, or "sum" (for token-weighted gradient accumulation).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree "
                         "on [B, T]")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"lm_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    # L = -(1/N) sum_{t: y_{t+1} != -100} log p(y_{t+1} | y_<=t): token t's logits predict token t+1.
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    targets = int((shifted_labels != IGNORE_INDEX).sum())
    if targets == 0:
        raise ValueError("lm_loss: no target tokens (every shifted label is -100); check the labels mask")
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Discriminative baseline loss: L = -mean log sigma(r_chosen - r_rejected) (Bradley-Terry)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"bradley_terry_loss: r_chosen {tuple(r_chosen.shape)} and r_rejected "
                         f"{tuple(r_rejected.shape)} must have the same shape")
    # logsigmoid is the stable form of log(1 / (1 + exp(-D))).
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def optimal_margin(eps: float) -> float:
    """The margin that minimises the smoothed loss: D* = log((2 - eps) / eps) (infinite at eps = 0).

    From dL/dD = -sigma(-D) + eps/2 = 0  =>  sigma(-D*) = eps/2  =>  exp(D*) = (2 - eps) / eps.
    """
    if not 0 <= eps < 2:
        raise ValueError(f"optimal_margin: eps must be in [0, 2), got {eps}")
    return math.inf if eps == 0 else math.log((2 - eps) / eps)
