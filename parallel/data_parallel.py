"""Replicated data parallelism: gradient and scalar sums over the dp group.

Losses are normalised by the global count of valid tokens before backward, so gradients are
summed (not averaged) here and one step equals the same global batch on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_gradients(params, group: dist.ProcessGroup | None, bucket_bytes: int = 64 << 20) -> None:
    """Sums .grad of `params` over `group` in flattened buckets (one collective per bucket)."""
    if group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
            bucket, size = [], 0
