"""AdamW with CLIP's parameter groups, and a linear warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from clipkd_dino.config import OptimConfig


def exclude_from_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases, norms, embeddings of rank < 2 and the logit scale get no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if exclude_from_weight_decay(n, p)]
    decay = [p for n, p in named if not exclude_from_weight_decay(n, p)]
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
    )


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimiser step `step` (0-based): linear from 1/warmup to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)
    )
