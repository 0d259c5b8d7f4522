"""AdamW with decay / no-decay parameter groups, frozen parameters left out, and warmup + cosine.

Frozen parameters (``requires_grad=False``, set by the trainer from a stage's ``train`` / ``freeze``
patterns) are in no group, so AdamW keeps no state for them: no optimizer
memory, and they never change.
"""

from __future__ import annotations

import math

import torch

__all__ = ["param_groups", "build_optimizer", "warmup_cosine", "build_scheduler"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only: matrices decay, vectors (norms, biases) do not. Shared (tied)
    parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("every parameter is frozen: nothing to train")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, max_steps, min_lr_ratio)
    )
