"""The zigzag causal block rule shared by every ring schedule.

Rank r holds chunks (r, 2P-1-r) of queries and keys. For queries owned by rank `q_owner` and
keys owned by rank `kv_owner`:
  same rank          causal attention over the whole local 2c x 2c block
  kv_owner < q_owner all 2c queries x the first c keys (chunk kv_owner), no mask
  kv_owner > q_owner the last c queries (chunk 2P-1-q_owner) x all 2c keys, no mask
so every step after the first costs 2c^2 on every rank (zhuzilin/ring-flash-attention's zigzag
rule; TokenRing applies the same rule with queries travelling instead of keys).

Packed documents (issue 18): every schedule takes `docs`, the document id of every position of
the whole (padded) rows in natural order, [B, 2Pc], a host tensor that every rank of the group
holds (the trainer reads whole rows before it splits them). `Documents` gives the ids of any
owner's zigzag shard, so the block a rank computes is masked by the ids of the queries and keys
it holds, whichever rank they came from: no ids travel, and each rank masks exactly the pairs a
single process would. Blocks with no visible pair run no kernel (block_attn's tiles).
"""

from __future__ import annotations

import torch

from ..kernels.attention import block_attn, block_attn_bwd, merge_into
from . import layout


class Documents:
    """Document ids of whole rows [B, 2Pc] (natural order) seen by a group of P zigzag ranks."""

    def __init__(self, ids: torch.Tensor, world: int) -> None:
        if ids.dim() != 2 or ids.shape[1] % (2 * world):
            raise ValueError(f"document ids {tuple(ids.shape)}: expected [rows, a multiple of 2 x {world}]")
        self.ids, self.world = ids, world
        self._shards: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, docs, world: int):
        """None, a Documents for this group size, or one made from whole-row ids."""
        if docs is None or isinstance(docs, Documents) and docs.world == world:
            return docs
        return cls(docs.ids if isinstance(docs, Documents) else docs, world)

    def shard(self, owner: int) -> torch.Tensor:
        """The ids of `owner`'s zigzag shard [B, 2c] (chunks owner and 2P-1-owner)."""
        if owner not in self._shards:
            self._shards[owner] = layout.split(self.ids, owner, self.world)
        return self._shards[owner]


def _block_docs(docs: Documents | None, q_owner: int, kv_owner: int, q_slice: slice, k_slice: slice):
    if docs is None:
        return None, None
    return docs.shard(q_owner)[:, q_slice], docs.shard(kv_owner)[:, k_slice]


def q_rows(q_owner: int, kv_owner: int, n: int) -> slice:
    """Rows of the owner's local queries that see any of kv_owner's keys."""
    return slice(n // 2, n) if kv_owner > q_owner else slice(0, n)


def kv_rows(q_owner: int, kv_owner: int, n: int) -> slice:
    return slice(0, n // 2) if kv_owner < q_owner else slice(0, n)


def attend(q, k, v, q_owner: int, kv_owner: int, kernel: str = "auto", docs: Documents | None = None):
    """(out, lse) for q[:, q_rows] against the visible keys. q may already be just those rows."""
    n = k.shape[1]
    ks, qs = kv_rows(q_owner, kv_owner, n), q_rows(q_owner, kv_owner, n)
    if q.shape[1] == n:
        q = q[:, qs]
    return block_attn(q, k[:, ks], v[:, ks], q_owner == kv_owner, kernel, *_block_docs(docs, q_owner, kv_owner, qs, ks))


def attend_bwd(dout, q, k, v, out, lse, q_owner: int, kv_owner: int, kernel: str = "auto",
               docs: Documents | None = None):
    """(dq, dk, dv, kv_slice) of one block: dq for the q rows given (or q_rows), dk/dv for kv_slice."""
    n = k.shape[1]
    ks, qs = kv_rows(q_owner, kv_owner, n), q_rows(q_owner, kv_owner, n)
    if q.shape[1] == n:
        q, dout, out, lse = q[:, qs], dout[:, qs], out[:, qs], lse[:, :, qs]
    # lse[:, :, qs] is a strided view: block_attn_bwd hands every kernel contiguous tensors
    dq, dk, dv = block_attn_bwd(dout, q, k[:, ks], v[:, ks], out, lse, q_owner == kv_owner, kernel,
                                *_block_docs(docs, q_owner, kv_owner, qs, ks))
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
    `kernel` the block kernel (kernels.attention.KERNELS) every block runs with; `docs` the
    whole rows' document ids (packed documents) or None."""

    @staticmethod
    def forward(ctx, q, k, v, group, schedule, kernel="auto", docs=None):
        out, lse = schedule.forward(group, q, k, v, kernel=kernel, docs=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.schedule, ctx.kernel, ctx.docs = group, schedule, kernel, docs
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = ctx.schedule.backward(ctx.group, dout.contiguous(), *ctx.saved_tensors, kernel=ctx.kernel,
                                      docs=ctx.docs)
        return (*grads, None, None, None, None)
