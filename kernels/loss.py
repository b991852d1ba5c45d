"""The loss head: hidden [N, D] x weight [V, D] -> cross-entropy over labels [N].

One dispatch point; the run log names the implementation that ran. `reference` materialises
the N x V logits (the naive head every other implementation is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("reference",)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """logits = hidden @ weight.T in fp32, then cross-entropy (+ z_loss * lse^2 per valid token)."""
    logits = (hidden @ weight.T).float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if z_loss:
        valid = labels != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp(min=1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    impl: str = "reference",
) -> torch.Tensor:
    if impl == "reference":
        return reference_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, z_loss)
    raise ValueError(f"loss impl {impl!r} is not one of {IMPLS}")
