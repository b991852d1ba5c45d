"""TokenRing: queries circulate one way, partial outputs return the other way (Wang et al.,
"TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via Bidirectional
Communication", arXiv 2412.20501, §3; ACA-Lab-SJTU/token-ring, forward only).

K and V never move. Rank r, step s holds the queries of owner o = (r + s) mod P (queries move to
rank r-1 each step), attends them to its local K/V under the zigzag rule, and sends the partial
(out, lse) straight back to o one step later, while the next queries arrive: the query channel
and the return channel run in opposite directions at once. A query block visits the ranks that
need all of it first and then those that need only its late half, so after the wrap only the
half is forwarded.

Backward (ours; the public code has none): the queries travel again with dO, LSE and
s = D / |dO|^2 per row, D = rowsum(dO * O) (FlashAttention-2's backward uses O only through D,
so s [B, H, S] travels instead of O [B, S, H, d] and the receiver rebuilds an O' = s * dO with
the same D in one pass); each rank adds its block's dK/dV to local accumulators (no K/V
traffic at all) and returns the partial dQ (fp32) to the owner the other way round, with the
same one-step delay.

Overlap, in forward and backward: each step first posts the queries of the next step (ring
channel) and the return of the previous step's partial (return channel: its own process group,
so on NCCL neither queues behind the other), then computes, then waits. The diagonal block is
computed while the first queries travel; only the last return is exposed.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .blocks import Documents, ScheduleAttention, attend, attend_bwd, merge_rows, q_rows
from .p2p import communicator, compute


def _half(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return x.narrow(dim, x.shape[dim] // 2, x.shape[dim] // 2)


def _travel(comm, bundle: list[torch.Tensor], holder: int, step: int, P: int, n: int, whole: bool = False):
    """Posts the query bundle held at `step` to the previous rank; returns (pending, received bundle).

    The bundle's owner is (holder + step) mod P; the receiver (holder - 1) needs all rows if the
    owner is ahead of it, else only the late half (dims: [B, S, ...] tensors, and lse [B, H, S]);
    `whole`: every rank needs all rows (packed documents in a balanced layout)."""
    receiver, owner = (holder - 1) % P, (holder + step) % P
    full = whole or owner > receiver
    out_bundle = []
    recv_bundle = []
    for t in bundle:
        dim = 2 if t.dim() == 3 else 1  # lse is [B, H, S]
        send = t if (full or t.shape[dim] == n // 2) else _half(t, dim)
        if t.shape[dim] != n and full:
            raise AssertionError("a half query block cannot feed a rank that needs all of it")
        out_bundle.append(send)
    for t in bundle:
        dim = 2 if t.dim() == 3 else 1
        shape = list(t.shape)
        # what we receive from holder+1: owner (holder + 1 + step) mod P, for us (holder) at step+1
        recv_owner = (holder + step + 1) % P
        shape[dim] = n if whole or recv_owner > holder else n // 2
        recv_bundle.append(torch.empty(shape, dtype=t.dtype, device=t.device))
    pending = comm.exchange([(t, comm.prev) for t in out_bundle], [(t, comm.next) for t in recv_bundle],
                            channel="ring", what=f"q {step + 1}")
    return pending, recv_bundle


def _out_scale(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """s = D / |dO|^2 per (batch, head, row) in fp32, [B, H, S] like the LSE, where
    D = rowsum(dO * O): what travels instead of O, since O' = s * dO has rowsum(dO * O') = D
    (0 where dO is 0, where D is 0 too), and D is all of O that the backward reads."""
    d32 = dout.float()
    delta = (d32 * out.float()).sum(-1)
    norm = d32.pow(2).sum(-1)
    scale = torch.where(norm > 0, delta / norm.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return scale.transpose(1, 2).contiguous()


def _stand_in_out(dout: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """O' = s * dO for kernels that take O rather than D: one pass at the receiver."""
    return (dout.float() * scale.transpose(1, 2)[..., None]).to(dout.dtype)


def _return_shapes(r: int, sender: int, like: torch.Tensor, n: int, dim: int = 1, whole: bool = False):
    shape = list(like.shape)
    shape[dim] = n if whole or r > sender else n // 2
    return shape


def _post_return(comm, partials, owner: int, step: int, n: int, likes, whole: bool = False):
    """Sends the partials computed at step-1 home to `owner` and posts the receive of ours from
    the rank that computed them, on the return channel. `likes` = [(tensor like ours, sequence
    dim, dtype)] per partial."""
    r, P = comm.rank, comm.world
    sender = (r - (step - 1)) % P
    received = [torch.empty(_return_shapes(r, sender, like, n, dim, whole), dtype=dtype, device=like.device)
                for like, dim, dtype in likes]
    pending = comm.exchange([(t, owner) for t in partials], [(t, sender) for t in received],
                            channel="return", what=f"partial {step - 1}")
    return pending, received, sender


def _ring(comm, n: int, bundle: list[torch.Tensor], first, block, land, likes, whole: bool = False):
    """The TokenRing loop shared by forward and backward.

    bundle is what our queries travel with; first() computes the diagonal block; block(step, bundle) -> (partials) computes the block of
    the queries held at `step`; land(partials, sender) adds a returned partial of our queries.
    Order per step s (the paper's point): post the queries of step s+1 and the return of step
    s-1's partial, compute step s, then wait; the last return is exposed."""
    P, r = comm.world, comm.rank
    q_pending = nxt = None
    if P > 1:
        q_pending, nxt = _travel(comm, bundle, r, 0, P, n, whole)
    with compute("step 0"):
        first()
    returning = None  # (partials, owner) computed last step
    for step in range(1, P + 1):
        if step < P:
            q_pending.wait()
            bundle = nxt
            if step < P - 1:
                q_pending, nxt = _travel(comm, bundle, r, step, P, n, whole)
        ret = None
        if returning is not None:  # last step's partials go home while this step computes
            partials, owner = returning
            ret = _post_return(comm, partials, owner, step, n, likes, whole)
        if step < P:
            with compute(f"step {step}"):
                returning = (block(step, bundle), (r + step) % P)
        if ret is not None:
            pending, received, sender = ret
            pending.wait()
            land(received, sender)


def forward(group: dist.ProcessGroup, q, k, v, kernel: str = "auto", docs=None):
    comm = communicator(group)
    r, n = comm.rank, q.shape[1]
    docs = Documents.of(docs, comm.world)
    acc = {}

    def first():
        out, lse = attend(q, k, v, r, r, kernel=kernel, docs=docs)
        acc["out"], acc["lse"] = out.float(), lse.float()

    def block(step, bundle):
        part_out, part_lse = attend(bundle[0], k, v, (r + step) % comm.world, r, kernel=kernel, docs=docs)
        return [part_out, part_lse.float()]

    def land(received, sender):
        part_out, part_lse = received
        acc["out"], acc["lse"] = merge_rows(acc["out"], acc["lse"], part_out, part_lse, q_rows(r, sender, n, docs))

    lse_like = torch.empty(q.shape[0], q.shape[2], n, device=q.device)  # [B, H, n]: only its shape is read
    _ring(comm, n, [q], first, block, land, [(q, 1, q.dtype), (lse_like, 2, torch.float32)],
          docs is not None and docs.permuted)
    return acc["out"].to(q.dtype), acc["lse"]


def backward(group: dist.ProcessGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    comm = communicator(group)
    r, n = comm.rank, q.shape[1]
    docs = Documents.of(docs, comm.world)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    acc = {}

    def first():
        dq0, dk_part, dv_part, ks = attend_bwd(dout, q, k, v, out, lse, r, r, kernel=kernel, docs=docs)
        acc["dq"] = dq0.float()
        dk[:, ks] += dk_part.float()
        dv[:, ks] += dv_part.float()

    def block(step, bundle):
        q_o, dout_o, scale_o, lse_o = bundle
        stand_in = _stand_in_out(dout_o, scale_o)
        part_dq, dk_part, dv_part, ks = attend_bwd(dout_o, q_o, k, v, stand_in, lse_o, (r + step) % comm.world, r,
                                                   kernel=kernel, docs=docs)
        dk[:, ks] += dk_part.float()
        dv[:, ks] += dv_part.float()
        return [part_dq.float()]

    def land(received, sender):
        acc["dq"][:, q_rows(r, sender, n, docs)] += received[0]

    _ring(comm, n, [q, dout, _out_scale(dout, out), lse], first, block, land, [(q, 1, torch.float32)],
          docs is not None and docs.permuted)
    return acc["dq"].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
        kernel: str = "auto", docs=None) -> torch.Tensor:
    """Causal attention over a zigzag-sharded sequence; same contract as ring.ring_attention."""
    return ScheduleAttention.apply(q, k, v, group, sys.modules[__name__], kernel, docs)
