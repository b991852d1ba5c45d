"""Hybrid sequence parallelism: Ulysses inside a node, a zigzag ring (or all-gather) schedule
across nodes (USP: Fang & Zhao, "USP: A Unified Sequence Parallelism Approach for Long Context
Generative AI", arXiv 2405.07719, §3; yunchang's LongContextAttention; TransformerEngine's
`a2a+p2p` context parallelism).

The sp degree is P = u x r and sp rank p = j*u + i: inner rank i, outer rank j. The inner group
{j*u, ..., j*u+u-1} is consecutive (one node), the outer group {i, u+i, 2u+i, ...} strided.
The zigzag shards of the inner ranks j*u .. j*u+u-1 (chunks j*u+i and 2P-1-j*u-i) together are
exactly outer rank j's zigzag shard when the sequence is cut into 2r big chunks (big chunks j
and 2r-1-j), so no data is reordered across nodes:
  1. all-to-all over `inner` (ulysses.seq_to_heads): scatter heads, gather sequence; the u
     shards' first halves in order, then their second halves in reverse order, are big chunk j
     followed by big chunk 2r-1-j, each in natural order;
  2. the outer schedule (ring, token_ring, bidir_kv, allgather_kv: all written for a zigzag
     shard) over `outer`, on Hq/u query heads;
  3. all-to-all back.
When Hkv % u != 0, K/V heads are repeated up to Hq before the all-to-all and their gradients
summed back. u = P is Ulysses alone; r = P is the outer schedule alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.attention import block_attn, block_attn_bwd, sum_kv_heads
from .blocks import whole_rows
from .ulysses import (
    HeadsToSeq,
    SeqToHeads,
    check_heads,
    heads_to_seq,
    kv_heads_for,
    seq_to_heads,
    whole_sequence_attention,
)

OUTER_SCHEDULES = ("ring", "token_ring", "bidir_kv", "allgather_kv")


@dataclass(frozen=True)
class HybridGroup:
    inner: dist.ProcessGroup | None  # u consecutive sp ranks (Ulysses); None when u == 1
    outer: dist.ProcessGroup | None  # r strided sp ranks (the outer schedule); None when r == 1
    outer_schedule: str  # one of OUTER_SCHEDULES

    def __post_init__(self) -> None:
        if self.outer_schedule not in OUTER_SCHEDULES:
            raise ValueError(f"hybrid outer schedule {self.outer_schedule!r}: expected one of {', '.join(OUTER_SCHEDULES)}")

    @property
    def ulysses_degree(self) -> int:
        return 1 if self.inner is None else dist.get_world_size(self.inner)


def _outer_module(name: str):
    # imported by name: parallel/attention.py imports this module and the schedules alike
    return importlib.import_module(f"{__package__}.{name}")


def forward(group: HybridGroup, q, k, v, kernel: str = "auto", docs=None):
    """(out, lse); lse is the outer schedule's (or, when r == 1, [B, Hq/u, S] of the whole
    sequence), in the head-sharded layout: only `backward` reads it."""
    u, Hq = group.ulysses_degree, q.shape[2]
    check_heads(Hq, u, "hybrid sequence parallelism")
    if group.inner is not None:
        k, v = kv_heads_for(k, Hq, u), kv_heads_for(v, Hq, u)
        q, k, v = (seq_to_heads(t, group.inner) for t in (q, k, v))
    if group.outer is None:
        out, lse = block_attn(q, k, v, True, kernel, *whole_rows(docs))
    else:  # the outer rank's shard of a 2r-chunk split: the outer schedule reads its ids from the whole rows
        out, lse = _outer_module(group.outer_schedule).forward(group.outer, q, k, v, kernel=kernel, docs=docs)
    if group.inner is not None:
        out = heads_to_seq(out.contiguous(), group.inner)
    return out, lse


def backward(group: HybridGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    """Gradients from the kept (out, lse): q, k, v, out and dout go to the head layout again."""
    u, Hq, Hkv = group.ulysses_degree, q.shape[2], k.shape[2]
    check_heads(Hq, u, "hybrid sequence parallelism")
    kr, vr = k, v
    if group.inner is not None:
        kr, vr = kv_heads_for(k, Hq, u), kv_heads_for(v, Hq, u)
        q, kr, vr, out, dout = (seq_to_heads(t.contiguous(), group.inner) for t in (q, kr, vr, out, dout))
    if group.outer is None:
        grads = block_attn_bwd(dout, q, kr, vr, out, lse, True, kernel, *whole_rows(docs))
    else:
        grads = _outer_module(group.outer_schedule).backward(group.outer, dout, q, kr, vr, out, lse, kernel=kernel,
                                                             docs=docs)
    if group.inner is None:
        return grads
    dq, dk, dv = (heads_to_seq(t.contiguous(), group.inner) for t in grads)
    if dk.shape[2] != Hkv:  # sum the repeated heads back onto their K/V head
        dk, dv = sum_kv_heads(dk, Hkv), sum_kv_heads(dv, Hkv)
    return dq, dk, dv


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: HybridGroup,
                     kernel: str = "auto", docs=None) -> torch.Tensor:
    """Causal attention over a zigzag-sharded sequence (sp rank p = j*u + i holds chunks p and
    2P-1-p); q [B, 2c, Hq, D], k/v [B, 2c, Hkv, D], Hq divisible by u."""
    u, Hq = group.ulysses_degree, q.shape[2]
    check_heads(Hq, u, "hybrid sequence parallelism")
    if group.inner is not None:
        k, v = kv_heads_for(k, Hq, u), kv_heads_for(v, Hq, u)  # autograd sums the repeats back
        q, k, v = (SeqToHeads.apply(t, group.inner) for t in (q, k, v))
    if group.outer is None:
        out = whole_sequence_attention(q, k, v, kernel, docs)
    else:
        name = group.outer_schedule
        out = getattr(_outer_module(name), f"{name}_attention")(q, k, v, group.outer, kernel=kernel, docs=docs)
    return out if group.inner is None else HeadsToSeq.apply(out, group.inner)


def make_groups(sp_ranks: list[int], inner: int, outer_schedule: str = "ring") -> HybridGroup | None:
    """Creates the inner and outer groups of one sp group (global ranks `sp_ranks`, ascending, in
    sp-rank order) and returns this rank's HybridGroup, or None when this rank is not in it.

    dist.new_group is collective over the default group: every rank calls this, with the same
    arguments in the same order (once per sp group)."""
    P = len(sp_ranks)
    if inner < 1 or P % inner:
        raise ValueError(f"sp degree {P} is not a multiple of the Ulysses (inner) degree {inner}")
    if list(sp_ranks) != sorted(sp_ranks):
        raise ValueError(f"sp ranks {sp_ranks} must ascend: a process group numbers its ranks in ascending order")
    from .mesh import hybrid_layout  # the trainer's layout (imported here: mesh is below the schedules)
    from .p2p import new_group

    u, r, me = inner, P // inner, dist.get_rank()
    groups = {"inner": None, "outer": None}
    inner_sets, outer_sets = hybrid_layout(P, u)
    # u == 1 or r == 1 leaves that dimension without a group (nothing to talk to)
    for role, members in (("inner", inner_sets if u > 1 else []), ("outer", outer_sets if r > 1 else [])):
        for ranks in members:
            ranks = [sp_ranks[i] for i in ranks]
            created = new_group(ranks, twin=role == "outer")  # the outer ring schedule has a return channel
            if me in ranks:
                groups[role] = created
    return HybridGroup(groups["inner"], groups["outer"], outer_schedule) if me in sp_ranks else None
