"""All-gather-KV context parallelism, as in Llama 3 (Dubey et al., "The Llama 3 Herd of Models",
arXiv 2407.21783, §3.3.2), on the zigzag layout so that every rank does the same work.

Rank r holds chunks r and 2P-1-r (c tokens each) of Q, K and V. Forward: one all-gather of the
local K and V (one buffer) rebuilds the whole K/V sequence; query chunk i (global positions
ic .. ic+c-1) attends to keys [0, ic) without a mask and to its own chunk with the causal mask,
and the two partials merge by LSE. Rank r's two chunks see rc + c/2 and (2P-1-r)c + c/2 keys
per query on average: 2Pc^2 scores on every rank.

Backward: K/V are gathered again (forward keeps only the local shard: the gathered copy is P
times larger), dQ accumulates locally, dK/dV of the whole sequence accumulate in fp32, and a
reduce-scatter sums each rank's zigzag shard of them onto that rank. The all-gathers overlap the
two diagonal blocks (their keys are local; 1/2P of the rank's work), the reduce-scatter nothing;
in exchange a shard of K/V crosses each link once per pass instead of riding P-1 ring hops, and
a packed batch needs no per-hop masks.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ..kernels.attention import block_attn, block_attn_bwd, merge
from . import layout
from .blocks import Documents, ScheduleAttention
from .p2p import communicator, compute, posted

# backends whose all-gather and reduce-scatter we call; elsewhere (gloo) one batch of
# point-to-point transfers to every peer stands in (p2p.Communicator.to_every_peer)
NATIVE_COLLECTIVE_BACKENDS = ("nccl",)

# torch >= 2.13 names the flat collectives *_single (the *_tensor names warn there)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, group, native: bool | None = None, wait: bool = True):
    """[P, *x.shape]: every group rank's x, in group-rank order; with wait=False, (that buffer,
    Pending) with the transfers still in flight.

    native: torch's all-gather (NCCL's ring); otherwise x goes to every peer in one batch of
    point-to-point sends (gloo: its all-gather runs hop by hop in the calling thread, about 3x
    slower here than the batch, whose transfers progress together). None picks by the backend."""
    comm = communicator(group)
    if native is None:
        native = dist.get_backend(group) in NATIVE_COLLECTIVE_BACKENDS
    x = x.contiguous()
    gathered = torch.empty(comm.world * x.numel(), dtype=x.dtype, device=x.device)
    if native:
        work = _all_gather_flat(gathered, x.view(-1), group=group, async_op=True)
        comm.count_each_peer(x.numel() * x.element_size())
        pending = posted([work], "all-gather")
    else:
        pending = comm.to_every_peer(x.view(1, -1).expand(comm.world, -1), gathered.view(comm.world, -1),
                                     what="all-gather", wait=False)
    gathered = gathered.view(comm.world, *x.shape)
    if wait:
        pending.wait()
        return gathered
    return gathered, pending


def reduce_scatter(pieces: torch.Tensor, group, native: bool | None = None) -> torch.Tensor:
    """pieces [P, ...] -> the sum over group ranks of their pieces[me].

    native: torch's reduce-scatter (NCCL); otherwise each piece goes to its owner in one batch of
    point-to-point sends and the owner sums what arrives (gloo; see all_gather). None picks by
    the group's backend."""
    comm = communicator(group)
    if native is None:
        native = dist.get_backend(group) in NATIVE_COLLECTIVE_BACKENDS
    pieces = pieces.contiguous()
    if native:
        comm.count_each_peer(pieces[0].numel() * pieces.element_size())
        mine = torch.empty(pieces[0].numel(), dtype=pieces.dtype, device=pieces.device)
        _reduce_scatter_flat(mine, pieces.view(-1), group=group)
        return mine.view(pieces.shape[1:])
    received = torch.empty(pieces.shape, dtype=pieces.dtype, device=pieces.device)
    comm.to_every_peer(pieces, received, what="reduce-scatter")  # received[j] = rank j's pieces[me]
    return received.sum(0)


def _post_gather_kv(k: torch.Tensor, v: torch.Tensor, group):
    """Posts the all-gather of every rank's K/V shard; returns finish() -> the whole K and V,
    [B, 2Pc, Hkv, D] each in natural order (what runs before finish() overlaps the transfer)."""
    shards, pending = all_gather(torch.stack([k, v]), group, wait=False)  # [P, 2, B, 2c, Hkv, D]

    def finish():
        pending.wait()
        whole = layout.unsplit(list(shards), shards.shape[0] * k.shape[1], dim=2)
        return whole[0], whole[1]
    return finish


def _query_chunks(rank: int, P: int, c: int):
    """(local rows, key blocks) of this rank's two query chunks; a key block is (key slice,
    causal): the chunk's own keys under the causal mask, then every earlier key unmasked."""
    chunks = []
    for rows, chunk in zip((slice(0, c), slice(c, 2 * c)), layout.chunk_ids(rank, P)):
        start = chunk * c
        blocks = [(slice(start, start + c), True)]
        if start:
            blocks.append((slice(0, start), False))
        chunks.append((rows, blocks))
    return chunks


def _docs(docs: Documents | None, rank: int, rows: slice, keys: slice | None):
    """(query ids, key ids) of a block: the rank's rows, and its own rows (keys None) or the
    whole sequence's keys `keys` (natural order)."""
    if docs is None:
        return None, None
    mine = docs.shard(rank)
    return mine[:, rows], mine[:, rows] if keys is None else docs.ids[:, keys]


def _forward_any_order(group, q, k, v, kernel: str, docs: Documents):
    """forward for packed documents in a balanced layout (rows in no causal order): the local
    queries against every rank's K/V shard, the positions within documents deciding which pairs
    are seen; the local shard's block computes while the all-gather is in flight."""
    comm = communicator(group)
    me = comm.rank
    shards, pending = all_gather(torch.stack([k, v]), group, wait=False)  # [P, 2, B, 2c, Hkv, D]
    with compute("local keys"):
        out, lse = merge(None, None, *block_attn(q, k, v, False, kernel, docs.shard(me), docs.shard(me)))
    pending.wait()
    for j in range(comm.world):
        if j != me:
            out, lse = merge(out, lse, *block_attn(q, shards[j, 0], shards[j, 1], False, kernel, docs.shard(me),
                                                   docs.shard(j)))
    return out.to(q.dtype), lse


def _backward_any_order(group, dout, q, k, v, out, lse, kernel: str, docs: Documents):
    comm = communicator(group)
    me = comm.rank
    shards, pending = all_gather(torch.stack([k, v]), group, wait=False)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros((comm.world, 2, *k.shape), dtype=torch.float32, device=k.device)  # per owner's shard

    def block(j, k_j, v_j):
        dq_b, dk_b, dv_b = block_attn_bwd(dout, q, k_j, v_j, out, lse, False, kernel, docs.shard(me), docs.shard(j))
        dq.add_(dq_b)
        dkv[j, 0] += dk_b
        dkv[j, 1] += dv_b

    with compute("local keys"):
        block(me, k, v)
    pending.wait()
    for j in range(comm.world):
        if j != me:
            block(j, shards[j, 0], shards[j, 1])
    dk, dv = reduce_scatter(dkv, group)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def forward(group: dist.ProcessGroup, q, k, v, kernel: str = "auto", docs=None):
    """(out, lse [B, Hq, 2c] fp32) of the local query chunks against the gathered keys. The two
    diagonal blocks need only local keys: they compute while the all-gather is in flight."""
    comm = communicator(group)
    docs = Documents.of(docs, comm.world)
    if docs is not None and docs.permuted:
        return _forward_any_order(group, q, k, v, kernel, docs)
    finish = _post_gather_kv(k, v, group)
    chunks = _query_chunks(comm.rank, comm.world, q.shape[1] // 2)
    with compute("diagonal"):
        parts = [[block_attn(q[:, rows], k[:, rows], v[:, rows], True, kernel, *_docs(docs, comm.rank, rows, None))]
                 for rows, _ in chunks]
    k_all, v_all = finish()
    outs, lses = [], []
    for (rows, blocks), part in zip(chunks, parts):
        out, lse = merge(None, None, *part[0])
        for keys, causal in blocks[1:]:  # the unmasked prefix
            out, lse = merge(out, lse, *block_attn(q[:, rows], k_all[:, keys], v_all[:, keys], causal, kernel,
                                                   *_docs(docs, comm.rank, rows, keys)))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 2)


def backward(group: dist.ProcessGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    comm = communicator(group)
    P, c = comm.world, q.shape[1] // 2
    docs = Documents.of(docs, P)
    if docs is not None and docs.permuted:
        return _backward_any_order(group, dout, q, k, v, out, lse, kernel, docs)
    finish = _post_gather_kv(k, v, group)
    chunks = _query_chunks(comm.rank, P, c)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # dK, dV of every key (fp32), the diagonal blocks' first: they need only local keys
    dkv_all = torch.zeros((2, k.shape[0], P * k.shape[1], *k.shape[2:]), dtype=torch.float32, device=k.device)

    def block(rows, keys, causal, k_src, v_src, k_rows):
        ids = _docs(docs, comm.rank, rows, None if k_src is k else keys)
        dq_b, dk_b, dv_b = block_attn_bwd(dout[:, rows], q[:, rows], k_src[:, k_rows], v_src[:, k_rows], out[:, rows],
                                          lse[:, :, rows], causal, kernel, *ids)
        dq[:, rows] += dq_b
        dkv_all[0][:, keys] += dk_b
        dkv_all[1][:, keys] += dv_b

    with compute("diagonal"):
        for rows, blocks in chunks:
            block(rows, blocks[0][0], True, k, v, rows)
    k_all, v_all = finish()
    for rows, blocks in chunks:
        for keys, causal in blocks[1:]:
            block(rows, keys, causal, k_all, v_all, keys)
    # every rank's zigzag shard of the partial sums, summed onto their owners in fp32
    pieces = torch.stack([layout.split(dkv_all, owner, P, dim=2) for owner in range(P)])
    dk, dv = reduce_scatter(pieces, group)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                           kernel: str = "auto", docs=None) -> torch.Tensor:
    """Causal attention over a zigzag-sharded sequence; q [B, 2c, Hq, D], k/v [B, 2c, Hkv, D]."""
    return ScheduleAttention.apply(q, k, v, group, sys.modules[__name__], kernel, docs)
