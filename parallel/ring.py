"""Ring attention, the baseline: K and V rotate round the ring, queries stay (Liu et al., arXiv
2310.01889), with the zigzag layout for causal balance.

Forward, rank r, step s: attend local queries to the K/V block of rank (r - s) mod P while the
next block is already in flight from rank r-1 (posted before the compute, waited after).
Backward: K/V rotate again and a dK/dV accumulator (fp32) travels with them on the return
channel (parallel/p2p.py), gaining each rank's contribution; after P steps it is back at its
owner. dQ accumulates locally.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .blocks import Documents, ScheduleAttention, attend, attend_bwd, merge_rows, q_rows
from .p2p import communicator, compute


def forward(group: dist.ProcessGroup, q, k, v, kernel: str = "auto", docs=None):
    comm = communicator(group)
    P, r = comm.world, comm.rank
    docs = Documents.of(docs, P)
    out = lse = None
    cur_k, cur_v = k, v
    for step in range(P):
        src = (r - step) % P
        if step < P - 1:
            nxt_k, nxt_v = torch.empty_like(k), torch.empty_like(v)
            pending = comm.exchange([(cur_k, comm.next), (cur_v, comm.next)], [(nxt_k, comm.prev), (nxt_v, comm.prev)],
                                    what=f"kv {step + 1}")
        with compute(f"step {step}"):
            part_out, part_lse = attend(q, cur_k, cur_v, r, src, kernel=kernel, docs=docs)
            if out is None:
                out, lse = part_out.float(), part_lse.float()
            else:
                out, lse = merge_rows(out, lse, part_out, part_lse, q_rows(r, src, q.shape[1], docs))
        if step < P - 1:
            pending.wait()
            cur_k, cur_v = nxt_k, nxt_v
    return out.to(q.dtype), lse


def backward(group: dist.ProcessGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    comm = communicator(group)
    P, r, n = comm.world, comm.rank, q.shape[1]
    docs = Documents.of(docs, P)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cur_k, cur_v = k, v
    acc_recv = None
    for step in range(P):
        src = (r - step) % P
        if step < P - 1:
            nxt_k, nxt_v = torch.empty_like(k), torch.empty_like(v)
            kv_pending = comm.exchange([(cur_k, comm.next), (cur_v, comm.next)],
                                       [(nxt_k, comm.prev), (nxt_v, comm.prev)], what=f"kv {step + 1}")
        with compute(f"step {step}"):
            dq_part, dk_part, dv_part, ks = attend_bwd(dout, q, cur_k, cur_v, out, lse, r, src, kernel=kernel,
                                                              docs=docs)
            dq[:, q_rows(r, src, n, docs)] += dq_part
        if acc_recv is None:
            dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        else:  # the accumulator of this K/V block, from the ranks it visited, takes our part
            acc_pending, (dk_acc, dv_acc) = acc_recv
            acc_pending.wait()
        dk_acc[:, ks] += dk_part
        dv_acc[:, ks] += dv_part
        # pass the accumulator on with its block (after the last step it goes home, to r+1), on
        # the return channel so that it does not queue in front of the next K/V block
        in_k, in_v = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
        acc_recv = (comm.exchange([(dk_acc, comm.next), (dv_acc, comm.next)], [(in_k, comm.prev), (in_v, comm.prev)],
                                  channel="return", what=f"dkv {step}"),
                    (in_k, in_v))
        if step < P - 1:
            kv_pending.wait()
            cur_k, cur_v = nxt_k, nxt_v
    acc_pending, (dk, dv) = acc_recv
    acc_pending.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
        kernel: str = "auto", docs=None) -> torch.Tensor:
    """Causal attention over a zigzag-sharded sequence; q [B, 2c, Hq, D], k/v [B, 2c, Hkv, D];
    `docs` the whole rows' document ids [B, 2Pc] (packed documents, parallel/blocks.py) or None."""
    return ScheduleAttention.apply(q, k, v, group, sys.modules[__name__], kernel, docs)
