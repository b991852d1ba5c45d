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
    """Document ids of whole rows [B, 2Pc] seen by a group of P zigzag ranks, in the order the
    rows were split (natural order, or a balanced layout's order), with each token's position
    within its document when the order is not the natural one (`permuted`: the zigzag causal
    rule no longer says which rows see which, so every block takes all rows and the positions
    decide; parallel/layout.balanced_layout)."""

    def __init__(self, ids: torch.Tensor, world: int, positions: torch.Tensor | None = None) -> None:
        if ids.dim() != 2 or ids.shape[1] % (2 * world):
            raise ValueError(f"document ids {tuple(ids.shape)}: expected [rows, a multiple of 2 x {world}]")
        if positions is not None and positions.shape != ids.shape:
            raise ValueError(f"document positions {tuple(positions.shape)} do not match the ids {tuple(ids.shape)}")
        self.ids, self.positions, self.world = ids, positions, world
        self._shards: dict[int, object] = {}

    @property
    def permuted(self) -> bool:
        return self.positions is not None

    @classmethod
    def of(cls, docs, world: int):
        """None, a Documents for this group size: from whole-row ids, (ids, positions) of a
        balanced layout, or another group size's Documents (hybrid's outer group)."""
        if docs is None or isinstance(docs, Documents) and docs.world == world:
            return docs
        if isinstance(docs, Documents):
            return cls(docs.ids, world, docs.positions)
        if isinstance(docs, (tuple, list)):
            return cls(docs[0], world, docs[1])
        return cls(docs, world)

    def whole(self):
        """What block_attn takes for the whole rows (Ulysses: the sequence in split order)."""
        return (self.ids, self.positions) if self.permuted else self.ids

    def shard(self, owner: int):
        """`owner`'s zigzag shard (chunks owner and 2P-1-owner): ids [B, 2c], or (ids, positions)."""
        if owner not in self._shards:
            ids = layout.split(self.ids, owner, self.world)
            self._shards[owner] = ids if not self.permuted else (ids, layout.split(self.positions, owner, self.world))
        return self._shards[owner]

    def rows(self, owner: int, rows: slice):
        ids = self.shard(owner)
        return (ids[0][:, rows], ids[1][:, rows]) if self.permuted else ids[:, rows]


def whole_rows(docs) -> tuple:
    """(query docs, key docs) for a block over the whole rows, or (None, None)."""
    if docs is None:
        return None, None
    if isinstance(docs, Documents):
        return docs.whole(), docs.whole()
    return docs, docs


def _block_docs(docs: Documents | None, q_owner: int, kv_owner: int, q_slice: slice, k_slice: slice):
    if docs is None:
        return None, None
    return docs.rows(q_owner, q_slice), docs.rows(kv_owner, k_slice)


def q_rows(q_owner: int, kv_owner: int, n: int, docs: Documents | None = None) -> slice:
    """Rows of the owner's local queries that see any of kv_owner's keys (all of them in a
    balanced layout, where positions decide)."""
    if docs is not None and docs.permuted:
        return slice(0, n)
    return slice(n // 2, n) if kv_owner > q_owner else slice(0, n)


def kv_rows(q_owner: int, kv_owner: int, n: int, docs: Documents | None = None) -> slice:
    if docs is not None and docs.permuted:
        return slice(0, n)
    return slice(0, n // 2) if kv_owner < q_owner else slice(0, n)


def attend(q, k, v, q_owner: int, kv_owner: int, kernel: str = "auto", docs: Documents | None = None):
    """(out, lse) for q[:, q_rows] against the visible keys. q may already be just those rows."""
    n = k.shape[1]
    ks, qs = kv_rows(q_owner, kv_owner, n, docs), q_rows(q_owner, kv_owner, n, docs)
    if q.shape[1] == n:
        q = q[:, qs]
    return block_attn(q, k[:, ks], v[:, ks], q_owner == kv_owner, kernel, *_block_docs(docs, q_owner, kv_owner, qs, ks))


def attend_bwd(dout, q, k, v, out, lse, q_owner: int, kv_owner: int, kernel: str = "auto",
               docs: Documents | None = None):
    """(dq, dk, dv, kv_slice) of one block: dq for the q rows given (or q_rows), dk/dv for kv_slice."""
    n = k.shape[1]
    ks, qs = kv_rows(q_owner, kv_owner, n, docs), q_rows(q_owner, kv_owner, n, docs)
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
