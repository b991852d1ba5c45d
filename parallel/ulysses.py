"""DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509): all-to-all from sequence shards to head
shards, local causal attention on the whole sequence, all-to-all back. The peer baseline.

Needs Hq divisible by P (any P: 3 and 6 work like powers of two); when Hkv is not (GQA with
P > Hkv, or Hkv = 2 at P = 3), K/V heads are repeated up to Hq first and their gradients summed
back (as peers do: verl #1226, prime-rl #3042). The zigzag shards are put back in natural order
after the first all-to-all.

`seq_to_heads`/`heads_to_seq` over a sub-group of u consecutive sp ranks are also the inner step
of hybrid sequence parallelism (parallel/hybrid.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.attention import (
    BlockAttention,
    block_attn,
    block_attn_bwd,
    expand_kv_heads,
    local_attention,
    sum_kv_heads,
)
from . import layout
from .blocks import whole_rows
from .p2p import communicator


def _all_to_all(x: torch.Tensor, group, native: bool | None = None) -> torch.Tensor:
    """x [P, ...] -> y [P, ...] with y[j] = rank j's x[me]. native: torch's all-to-all (NCCL);
    otherwise one batch of point-to-point transfers (gloo); None picks by the backend."""
    comm = communicator(group)
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, unlike empty_like of a view
    if native is None:
        native = dist.get_backend(group) == "nccl"
    if native:
        dist.all_to_all_single(y, x, group=group)
        comm.count_each_peer(x[0].numel() * x.element_size())
    else:  # gloo: one batch of point-to-point transfers (p2p.Communicator.to_every_peer)
        comm.to_every_peer(x, y, what="all-to-all")
    return y


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, n, H, D] zigzag shard -> [B, P*n, H/P, D], my head group: the P shards' first halves in
    group-rank order, then their second halves in reverse order. Over the whole sp group that is
    the sequence in natural order; over a hybrid's inner group of u consecutive sp ranks it is
    the outer rank's zigzag shard of a 2r-chunk split (parallel/hybrid.py)."""
    P = dist.get_world_size(group)
    B, n, H, D = x.shape
    parts = _all_to_all(x.view(B, n, P, H // P, D).permute(2, 0, 1, 3, 4), group)
    return layout.unsplit(list(parts), P * n)


def heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads."""
    P = dist.get_world_size(group)
    B, S, h, D = y.shape
    shards = torch.stack([layout.split(y, j, P) for j in range(P)])  # [P, B, n, h, D]
    parts = _all_to_all(shards, group)  # parts[j] = my sequence shard, head group j
    return parts.permute(1, 2, 0, 3, 4).reshape(B, S // P, P * h, D)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad.contiguous(), ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad.contiguous(), ctx.group), None


def check_heads(heads_q: int, degree: int, what: str = "ulysses") -> None:
    if heads_q % degree:
        raise ValueError(f"{what} needs the query heads ({heads_q}) divisible by its all-to-all degree ({degree}); "
                         "use a ring schedule or a smaller Ulysses degree")


def kv_heads_for(k: torch.Tensor, heads_q: int, degree: int) -> torch.Tensor:
    """K or V with a head count the all-to-all can split: as is, or repeated up to heads_q."""
    return k if k.shape[2] % degree == 0 else expand_kv_heads(k, heads_q)


def forward(group: dist.ProcessGroup, q, k, v, kernel: str = "auto", docs=None):
    """(out, lse) without autograd; lse stays in the head-sharded layout [B, Hq/P, S] (only
    `backward` reads it). `docs`: the whole rows' document ids (packed documents) or None."""
    P, Hq = dist.get_world_size(group), q.shape[2]
    check_heads(Hq, P)
    qh, kh, vh = (seq_to_heads(t, group) for t in (q, kv_heads_for(k, Hq, P), kv_heads_for(v, Hq, P)))
    out_h, lse_h = block_attn(qh, kh, vh, True, kernel, *whole_rows(docs))
    return heads_to_seq(out_h.contiguous(), group), lse_h


def backward(group: dist.ProcessGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    """Gradients from the kept (out, lse): q, k, v, out and dout go to the head layout again."""
    P, Hq, Hkv = dist.get_world_size(group), q.shape[2], k.shape[2]
    kr, vr = kv_heads_for(k, Hq, P), kv_heads_for(v, Hq, P)
    qh, kh, vh, out_h, dout_h = (seq_to_heads(t.contiguous(), group) for t in (q, kr, vr, out, dout))
    dqh, dkh, dvh = block_attn_bwd(dout_h, qh, kh, vh, out_h, lse, True, kernel, *whole_rows(docs))
    dq, dk, dv = (heads_to_seq(t.contiguous(), group) for t in (dqh, dkh, dvh))
    if kr is not k:  # sum the repeated heads back onto their K/V head
        dk, dv = sum_kv_heads(dk, Hkv), sum_kv_heads(dv, Hkv)
    return dq, dk, dv


def whole_sequence_attention(q, k, v, kernel: str, docs=None):
    """Causal attention of a whole sequence after the all-to-all, with autograd: SDPA for `auto`
    without documents, else the block kernel (document-masked when `docs` are given)."""
    if docs is not None:
        return BlockAttention.apply(q, k, v, True, kernel, *whole_rows(docs))
    return local_attention(q, k, v) if kernel == "auto" else BlockAttention.apply(q, k, v, True, kernel)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                      kernel: str = "auto", docs=None) -> torch.Tensor:
    P, Hq = dist.get_world_size(group), q.shape[2]
    check_heads(Hq, P)
    k, v = kv_heads_for(k, Hq, P), kv_heads_for(v, Hq, P)
    qh, kh, vh = (SeqToHeads.apply(t, group) for t in (q, k, v))
    return HeadsToSeq.apply(whole_sequence_attention(qh, kh, vh, kernel, docs), group)
