"""The zigzag causal block rule shared by every ring schedule.

Rank r holds chunks (r, 2P-1-r) of queries and keys. For queries owned by rank `q_owner` and
keys owned by rank `kv_owner`:
  same rank          causal attention over the whole local 2c x 2c block
  kv_owner < q_owner all 2c queries x the first c keys (chunk kv_owner), no mask
  kv_owner > q_owner the last c queries (chunk 2P-1-q_owner) x all 2c keys, no mask
so every step after the first costs 2c^2 on every rank (zhuzilin/ring-flash-attention's zigzag
rule; TokenRing applies the same rule with queries travelling instead of keys).
"""

from __future__ import annotations

import torch

from ..kernels.attention import block_attn, block_attn_bwd, merge_into


def q_rows(q_owner: int, kv_owner: int, n: int) -> slice:
    """Rows of the owner's local queries that see any of kv_owner's keys."""
    return slice(n // 2, n) if kv_owner > q_owner else slice(0, n)


def kv_rows(q_owner: int, kv_owner: int, n: int) -> slice:
    return slice(0, n // 2) if kv_owner < q_owner else slice(0, n)


def attend(q, k, v, q_owner: int, kv_owner: int, kernel: str = "auto"):
    """(out, lse) for q[:, q_rows] against the visible keys. q may already be just those rows."""
    n = k.shape[1]
    ks = kv_rows(q_owner, kv_owner, n)
    if q.shape[1] == n:
        q = q[:, q_rows(q_owner, kv_owner, n)]
    return block_attn(q, k[:, ks], v[:, ks], causal=q_owner == kv_owner, impl=kernel)


def attend_bwd(dout, q, k, v, out, lse, q_owner: int, kv_owner: int, kernel: str = "auto"):
    """(dq, dk, dv, kv_slice) of one block: dq for the q rows given (or q_rows), dk/dv for kv_slice."""
    n = k.shape[1]
    ks = kv_rows(q_owner, kv_owner, n)
    if q.shape[1] == n:
        qs = q_rows(q_owner, kv_owner, n)
        q, dout, out, lse = q[:, qs], dout[:, qs], out[:, qs], lse[:, :, qs]
    # lse[:, :, qs] is a strided view: block_attn_bwd hands every kernel contiguous tensors
    dq, dk, dv = block_attn_bwd(dout, q, k[:, ks], v[:, ks], out, lse, causal=q_owner == kv_owner, impl=kernel)
    return dq, dk, dv, ks


def merge_rows(out, lse, part_out, part_lse, rows: slice):
    """Merges a partial result for q rows `rows` into the running fp32 accumulators, in place
    (they belong to the schedule); returns them."""
    merge_into(out[:, rows], lse[:, :, rows], part_out, part_lse)
    return out, lse


class ScheduleAttention(torch.autograd.Function):
    """The one autograd Function of the ring schedules: `schedule.forward(group, q, k, v) ->
    (out, lse)` in forward, `schedule.backward(group, dout, q, k, v, out, lse) -> (dq, dk, dv)` in
    backward, where `schedule` is the module (ring, token_ring, bidir_kv) holding both, and
    `kernel` the block kernel (kernels.attention.KERNELS) every block runs with."""

    @staticmethod
    def forward(ctx, q, k, v, group, schedule, kernel="auto"):
        out, lse = schedule.forward(group, q, k, v, kernel=kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.schedule, ctx.kernel = group, schedule, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = ctx.schedule.backward(ctx.group, dout.contiguous(), *ctx.saved_tensors, kernel=ctx.kernel)
        return (*grads, None, None, None)
