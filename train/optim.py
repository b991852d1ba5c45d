"""AdamW with decoupled weight decay (not on norms/biases) and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float, separate=()):
    """Groups: [decayed, not decayed (norms, biases)] and, when `separate` names parameters (the
    vocabulary shards: plain tensors beside FSDP2's DTensors, which one foreach call cannot mix),
    a third decayed group of those."""
    separate_ids = {id(p) for p in separate}
    decay, no_decay, own = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (own if id(p) in separate_ids else no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if own:
        groups.append({"params": own, "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, max_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, max_steps: int, warmup_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, max_steps, warmup_steps, min_ratio)
    )
