"""Mixed precision for training: fp32 master weights, bf16 autocast for compute, and a guard.

AdamW steps the parameters it is given in their own dtype. A bf16 weight has 8 significant bits, so an
update smaller than half its ulp (|w|·2⁻⁹) rounds away: at lr 1e-5–2e-5 that is most updates of most
weights (Adam's step is ~lr per element), and training silently does nothing. The recipe is therefore:
weights and optimizer state in fp32 (the master copy), matmuls in bf16 under ``torch.autocast`` (or FSDP
mixed precision, which casts the gathered shards to bf16 for compute). ``check_master_weights`` refuses
low-precision trainable parameters unless the caller opts in explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class LowPrecisionParamsError(ValueError):
    """Trainable parameters are bf16/fp16 and the optimizer would step them directly."""


def check_master_weights(named: Sequence[tuple[str, torch.nn.Parameter]], allow_low_precision: bool) -> None:
    """Raise unless every trainable parameter is fp32 (or ``allow_low_precision`` opts into stepping them)."""
    low = [(name, p.dtype) for name, p in named if p.dtype in LOW_PRECISION]
    if not low or allow_low_precision:
        return
    dtypes = sorted({str(d).removeprefix("torch.") for _, d in low})
    raise LowPrecisionParamsError(
        f"train: {len(low)} of {len(named)} trainable parameters are {'/'.join(dtypes)} (e.g. "
        f"{[n for n, _ in low[:3]]}); AdamW would step them directly, and updates smaller than half a "
        f"{dtypes[0]} ulp (most updates at lr ~1e-5) round away. Keep fp32 master weights: load the model with "
        "model.dtype float32 and set train.precision bf16 (bf16 autocast for compute), or set "
        "train.allow_low_precision_params true to step them anyway.")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_dtype(dtype: str, device: torch.device | str) -> str:
    """The weights dtype for scoring: 'auto' is bfloat16 on a GPU and float32 elsewhere (CPUs here run bf16
    matmuls ~300x slower); an explicit dtype is kept."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def default_device() -> torch.device:
    """The accelerator when one is present (CUDA), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
