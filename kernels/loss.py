"""The loss head: hidden [N, D] x weight [V, D] -> cross-entropy over labels [N].

One dispatch point, `linear_cross_entropy(..., impl=)`; `resolve_impl` names what will run so the
run log can say it. Implementations:
  reference  naive: N x V logits in fp32, then F.cross_entropy (what the others are tested against)
  cce        Cut Cross-Entropy: the Triton kernels on CUDA, else the chunked torch path
  cce_torch  the chunked torch path (kernels/cce_torch.py), on any device
  cce_triton the Triton kernels (kernels/cce.py); on CPU only under TRITON_INTERPRET=1
`filter_eps` (CCE gradient filtering, see `resolve_filter_eps`) is checked on every path; only the
Triton kernels filter: the reference and the chunked torch path compute every logit exactly.
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


def resolve_filter_eps(filter_eps: float | str | bool | None, dtype: torch.dtype) -> float | None:
    """CCE gradient filtering threshold on |softmax - onehot| (Wijmans et al. §4.3), or None for off.

    "auto" = finfo(dtype).eps / 32 (2^-12 for bf16, 2^-28 for fp32); a number in [0, 1) as given
    (|softmax - onehot| <= 1, so 1 or more would skip every tile: every gradient zero);
    "off", None or False (YAML reads a bare `off` as false) = no filtering.
    """
    if filter_eps is None or filter_eps is False or filter_eps == "off":
        return None
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool) and 0 <= filter_eps < 1:
        return float(filter_eps)
    raise ValueError(f"filter_eps={filter_eps!r}: expected 'auto', 'off' (or None) or a number in [0, 1)")


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
    filter_eps: float | str | None = "auto",
) -> torch.Tensor:
    impl = resolve_impl(impl, hidden.device)
    resolve_filter_eps(filter_eps, hidden.dtype)  # a bad value fails on every path, not only on CUDA
    if impl == "reference":
        return reference_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, softcap, z_loss)
    if impl == "cce_torch":
        from .cce_torch import linear_cross_entropy as cce_torch

        return cce_torch(hidden, weight, labels, ignore_index, reduction, softcap, z_loss)
    from .cce import linear_cross_entropy as cce_triton

    return cce_triton(hidden, weight, labels, ignore_index, reduction, softcap, z_loss, filter_eps=filter_eps)
