"""The loss head: hidden [N, D] x weight [V, D] -> cross-entropy over labels [N].

One dispatch point, `linear_cross_entropy(..., impl=)`; `resolve_impl` names what will run so the
run log can say it. Implementations:
  reference  naive: N x V logits in fp32, then F.cross_entropy (what the others are tested against)
  cce        Cut Cross-Entropy: the Triton kernels on CUDA, else the chunked torch path
  cce_torch  the chunked torch path (kernels/cce_torch.py), on any device
  cce_triton the Triton kernels (kernels/cce.py); on CPU only under TRITON_INTERPRET=1
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .capability import has_triton_gpu

IMPLS = ("reference", "cce", "cce_torch", "cce_triton")


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """logits = hidden @ weight.T in fp32 (softcapped), then cross-entropy (+ z_loss * lse^2 per valid token)."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2) * (labels != ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp(min=1)


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"loss impl {impl!r} is not one of {IMPLS}")
    if impl == "cce":
        return "cce_triton" if device.type == "cuda" and has_triton_gpu() else "cce_torch"
    if impl == "cce_triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("loss impl 'cce_triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return impl


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
    impl: str = "reference",
) -> torch.Tensor:
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        return reference_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, softcap, z_loss)
    if impl == "cce_torch":
        from .cce_torch import linear_cross_entropy as cce_torch

        return cce_torch(hidden, weight, labels, ignore_index, reduction, softcap, z_loss)
    from .cce import linear_cross_entropy as cce_triton

    return cce_triton(hidden, weight, labels, ignore_index, reduction, softcap, z_loss)
