"""AdamW's parameter groups: weight decay on matrices only, and the learning-rate multipliers of the final
norm's gain and the untied verdict rows (docs/stage2.md: the final RMSNorm damps every update to the verdict)."""

from __future__ import annotations

import torch

from gram_core.config import TrainConfig


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], config: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not norms and biases, as is standard for transformers);
    the final norm's gain and the untied verdict rows at their own learning-rate multipliers."""
    special = {id(p): config.final_norm_lr_multiplier for p in final_norm_params(model)}
    special.update({id(p): config.verdict_lr_multiplier for p in verdict_row_params(model)})
    groups: dict[tuple[float, float], list] = {}
    for p in params:
        scale = special.get(id(p), 1.0)
        decay = config.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    # The scheduler multiplies each group's own initial lr, so the multipliers hold through warm-up and decay.
    return [{"params": ps, "weight_decay": decay, "lr": config.learning_rate * scale}
            for (scale, decay), ps in groups.items()]


def final_norm_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The final norm's parameters (the RMSNorm between the last decoder layer and the LM head), or []."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    return list(norm.parameters()) if isinstance(norm, torch.nn.Module) else []


def verdict_row_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The untied LM head (model.untie_verdict_rows; stage 2 reads only its verdict rows), or [] when tied."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "get_output_embeddings") and hasattr(base, "get_input_embeddings")):
        return []
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or head.weight is embed.weight or not head.weight.requires_grad:
        return []
    return [head.weight]
