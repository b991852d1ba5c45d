"""Merging partial attention results over disjoint key sets by their log-sum-exp (fp32)."""

from __future__ import annotations

import torch


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor):
    """Merges a partial (out_i [B,S,H,D], lse_i [B,H,S]) into the running fp32 (out, lse)."""
    lse_i = torch.where(torch.isposinf(lse_i), torch.full_like(lse_i, float("-inf")), lse_i.float())
    if out is None:
        return out_i.float(), lse_i
    new = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # rows with no key yet
    w_old = torch.exp(lse - safe).transpose(1, 2)[..., None]
    w_new = torch.exp(lse_i - safe).transpose(1, 2)[..., None]
    return out * w_old + out_i.float() * w_new, new


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_i: torch.Tensor, lse_i: torch.Tensor) -> None:
    """`merge` in place: the fp32 accumulators (out, lse), possibly row views of larger ones, take
    the partial in without new full-size tensors (a ring merges P-1 partials per call)."""
    lse_i = torch.where(torch.isposinf(lse_i), float("-inf"), lse_i.float())
    new = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isneginf(new), 0.0, new)  # rows with no key yet
    out.mul_(torch.exp(lse - safe).transpose(1, 2)[..., None])
    out.addcmul_(out_i, torch.exp(lse_i - safe).transpose(1, 2)[..., None])
    lse.copy_(new)
