"""Vocabulary parallelism: the embedding and the loss head sharded over the vocabulary.

Vocabulary Parallelism (Yeung et al., arXiv 2411.05288, §4) splits the input embedding and the
output layer + softmax into contiguous row ranges, one per rank, and combines the softmax
statistics across ranks. longctx has no pipeline, so the vocabulary is sharded over the
sequence-parallel group (over every rank under FSDP2): rank r owns rows [r*c, min((r+1)*c, V))
with c = ceil(V/P) (torch.chunk's split, so a DTensor Shard(0) describes it; the last shards
may be short or empty), and no rank holds the V x D weights, their gradients or their optimizer
state. The ranks of the group need not hold the same tokens (short buckets run at a smaller sp
degree, dp ranks differ), only as many (the trainer's micro-batches are the same shape on every
rank): each rank's tokens meet every shard.

Two exact variants of each layer (../shared/notes/loss_head.md §5):
  gather  the group's tokens come to every shard: hidden states (ids) all-gathered, each rank
          runs Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009) on its shard for all of them,
          the per-shard log-sum-exp and target logit combined in one all-gather, dHidden
          reduce-scattered back; the embedding looks up its range for every id and the partial
          rows are reduce-scattered. Moves O(tokens x D): cheaper when the group's tokens are few.
  stream  tokens stay; the shards travel the ring (parallel/p2p.py, the next shard in flight
          while this one computes), each rank merging the shard's log-sum-exp into its tokens'
          running LSE; in backward the shards travel again with an fp32 gradient accumulator on
          the return channel that every rank adds its tokens' part to, arriving home after P
          steps (ring attention's dK/dV pattern). Moves O(V x D): cheaper for long sequences.
`auto` picks per call with `predict_seconds` (the byte model `longctx plan` prints).

The per-shard maths is kernels/cce_torch.py's (chunked, no N x V logits): loss_t = LSE_t - z_t,y
with LSE merged over shards by log-add-exp, and dz = p * (g + 2 z_loss LSE g) - onehot * g from
the global LSE, so the backward of each shard is local but for the accumulation of dHidden (gather)
or dWeight (stream).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.cce_torch import _chunk_grads, _chunk_lse_target
from . import p2p
from .p2p import communicator, compute

VARIANTS = ("gather", "stream")
SHARD_IMPLS = ("torch", "triton")
# The [tokens, rows] fp32 logit slab of one chunk: 16 MiB, a quarter of kernels/cce_torch.py's whole-vocabulary
# slab, since a shard holds a fraction of the rows (at 4 ranks the same tokens per chunk)
SLAB_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, stop) of a vocabulary of `vocab_size` split over `group`."""

    start: int
    stop: int
    group: dist.ProcessGroup | None
    vocab_size: int
    world: int
    rank: int

    @classmethod
    def of(cls, vocab_size: int, group: dist.ProcessGroup | None) -> "VocabShard":
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        start, stop = bounds(vocab_size, world, rank)
        return cls(start, stop, group, vocab_size, world, rank)

    @property
    def rows(self) -> int:
        """Rows of the largest shard: what a travelling (padded) shard holds."""
        return -(-self.vocab_size // self.world)

    def owner(self, rank: int) -> tuple[int, int]:
        """(start, number of rows) of rank `rank`'s shard."""
        start, stop = bounds(self.vocab_size, self.world, rank)
        return start, stop - start


def bounds(vocab_size: int, world: int, rank: int) -> tuple[int, int]:
    c = -(-vocab_size // world)
    return min(rank * c, vocab_size), min((rank + 1) * c, vocab_size)


def shard_rows(weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """This rank's rows of a full [V, D] weight (a copy)."""
    return weight[shard.start:shard.stop].clone()


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[:x.shape[0]] = x
    return out


# --- collectives as one batch of point-to-point transfers (what p2p counts) -----------------------
def _all_gather(comm, x: torch.Tensor) -> torch.Tensor:
    """[P, *x.shape]: every rank's x, in group rank order."""
    out = torch.empty((comm.world, *x.shape), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    peers = [p for p in range(comm.world) if p != comm.rank]
    pending = comm.exchange([(x, p) for p in peers], [(out[p], p) for p in peers], what="vocab gather")
    out[comm.rank].copy_(x)
    pending.wait()
    return out


def _reduce_scatter(comm, x: torch.Tensor) -> torch.Tensor:
    """x [P, ...] -> the sum over ranks of their x[me] (in rank order: the same sum on every run)."""
    y = torch.empty_like(x)
    comm.to_every_peer(x.contiguous(), y, what="vocab reduce-scatter")
    return y.sum(0)


def full_weight(weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The whole [V, D] weight from every rank's shard (collective over the group)."""
    if shard.world == 1:
        return weight
    parts = _all_gather(communicator(shard.group), _padded(weight.detach(), shard.rows))
    return torch.cat([parts[r, :shard.owner(r)[1]] for r in range(shard.world)])


# --- the per-shard maths (kernels/cce_torch.py's chunks) -------------------------------------------
def _chunks(n_tokens: int, n_rows: int):
    token_chunk = max(64, SLAB_ELEMENTS // max(n_rows, 1))
    vocab_chunk = n_rows if token_chunk * n_rows <= SLAB_ELEMENTS else max(1, SLAB_ELEMENTS // token_chunk)
    return [slice(t, t + token_chunk) for t in range(0, n_tokens, token_chunk)], max(vocab_chunk, 1)


def _one_dtype(h: torch.Tensor, w: torch.Tensor):
    """Outside autocast both operands in the promoted dtype: FSDP2's bf16 parameters hand the head
    bf16 hidden states while the shard, which FSDP2 leaves alone, stays fp32."""
    if torch.is_autocast_enabled(h.device.type) or h.dtype == w.dtype:
        return h, w
    dtype = torch.promote_types(h.dtype, w.dtype)
    return h.to(dtype), w.to(dtype)


def shard_lse_target(h, w, y_local, softcap, impl: str = "torch"):
    """Per token: log-sum-exp over the shard's rows and the target logit (0 where y_local is
    outside the shard). fp32 [N] each; an empty shard gives -inf and 0. impl: torch = the chunked
    path (any device), triton = kernels/cce.py's forward kernel (CUDA, or TRITON_INTERPRET=1)."""
    if impl == "triton":
        from ..kernels.cce import shard_lse_target as kernel

        return kernel(h, w, y_local, softcap)
    h, w = _one_dtype(h, w)
    lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
    target = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    if w.shape[0] == 0:
        return lse, target
    tokens, vocab_chunk = _chunks(h.shape[0], w.shape[0])
    for ts in tokens:
        lse[ts], target[ts] = _chunk_lse_target(h[ts], w, y_local[ts], softcap, vocab_chunk)
    return lse, target


def shard_grads(h, w, y_local, lse, g, z_loss, softcap, dw, impl: str = "torch", filter_eps=None):
    """dHidden [N, D] fp32 of the shard's rows given the global LSE and the per-token upstream
    gradient g; adds dWeight into dw (fp32). triton: the backward kernel, which skips tiles whose
    |softmax - onehot| < filter_eps (valid: the softmax is the global one)."""
    if impl == "triton":
        from ..kernels.cce import shard_grads as kernel

        return kernel(h, w, y_local, lse, g, z_loss, softcap, dw, filter_eps)
    h, w = _one_dtype(h, w)
    g_lse = 2 * z_loss * lse * g if z_loss else torch.zeros_like(g)
    if w.shape[0] == 0:
        return torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    tokens, vocab_chunk = _chunks(h.shape[0], w.shape[0])
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    for ts in tokens:
        dh[ts] = _chunk_grads(h[ts], w, y_local[ts], lse[ts], g[ts], g_lse[ts], softcap, vocab_chunk, dw, dw.dtype)
    return dh


def _autocast_state(device: torch.device):
    """The autocast state of the forward, so the backward's recomputed logits round as the forward's did."""
    return (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))


def _replay(state):
    kind, enabled, dtype = state
    return torch.autocast(kind, dtype=dtype, enabled=True) if enabled else contextlib.nullcontext()


def _ring(comm, x: torch.Tensor, step: int, what: str):
    """Posts x to the next rank and a receive from the previous (none after the last step)."""
    if step == comm.world - 1:
        return None, None
    buf = torch.empty_like(x)
    return comm.exchange([(x, comm.next)], [(buf, comm.prev)], what=f"{what} {step + 1}"), buf


# --- the loss head ------------------------------------------------------------------------------
class _StreamLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, ignore_index, softcap, z_loss, impl, filter_eps):
        comm = communicator(shard.group)
        keep = (labels != ignore_index).nonzero().squeeze(1)
        h, y = hidden[keep], labels[keep]
        lse = torch.full((len(keep),), float("-inf"), dtype=torch.float32, device=h.device)
        target = torch.zeros(len(keep), dtype=torch.float32, device=h.device)
        cur = _padded(weight.detach(), shard.rows)
        for step in range(shard.world):
            start, n = shard.owner((comm.rank - step) % shard.world)
            pending, nxt = _ring(comm, cur, step, "vocab shard")
            with compute(f"vocab {step}"):
                part_lse, part_target = shard_lse_target(h, cur[:n], y - start, softcap, impl)
                lse = torch.logaddexp(lse, part_lse)
                target += part_target
            if pending is not None:
                pending.wait()
                cur = nxt
        ctx.save_for_backward(h, weight, y, keep, lse)
        ctx.shard, ctx.softcap, ctx.z_loss, ctx.N = shard, softcap, z_loss, labels.shape[0]
        ctx.impl, ctx.filter_eps = impl, filter_eps
        ctx.autocast = _autocast_state(h.device)
        per_token = lse - target + (z_loss * lse * lse if z_loss else 0)
        return torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device).index_copy_(0, keep, per_token)

    @staticmethod
    def backward(ctx, grad):
        h, weight, y, keep, lse = ctx.saved_tensors
        shard, comm = ctx.shard, communicator(ctx.shard.group)
        g = grad[keep].float()
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        cur = _padded(weight.detach(), shard.rows)
        acc_recv = None
        for step in range(shard.world):
            start, n = shard.owner((comm.rank - step) % shard.world)
            pending, nxt = _ring(comm, cur, step, "vocab shard")
            part = torch.zeros((shard.rows, weight.shape[1]), dtype=torch.float32, device=h.device)
            with compute(f"vocab bwd {step}"), _replay(ctx.autocast):
                dh += shard_grads(h, cur[:n], y - start, lse, g, ctx.z_loss, ctx.softcap, part[:n], ctx.impl,
                                  ctx.filter_eps)
            if acc_recv is None:
                acc = part
            else:  # the accumulator of this shard, in flight while we computed, takes our part
                acc_recv[0].wait()
                acc = acc_recv[1].add_(part)
                del part
            incoming = torch.empty_like(acc)  # after the last step it goes home, to rank + 1
            acc_recv = (comm.exchange([(acc, comm.next)], [(incoming, comm.prev)], channel="return",
                                      what=f"vocab dw {step}"), incoming)
            if pending is not None:
                pending.wait()
                cur = nxt
        acc_recv[0].wait()
        dweight = acc_recv[1][:weight.shape[0]].to(weight.dtype)
        dhidden = torch.zeros((ctx.N, h.shape[1]), dtype=h.dtype, device=h.device)
        return dhidden.index_copy_(0, keep, dh.to(h.dtype)), dweight, None, None, None, None, None, None, None


class _GatherLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, ignore_index, softcap, z_loss, impl, filter_eps):
        comm = communicator(shard.group)
        N = labels.shape[0]
        every_h = _all_gather(comm, hidden.detach()).flatten(0, 1)
        every_y = _all_gather(comm, labels).flatten()
        keep = (every_y != ignore_index).nonzero().squeeze(1)
        h, y = every_h[keep], every_y[keep] - shard.start
        part = torch.stack(shard_lse_target(h, weight, y, softcap, impl))
        stats = _all_gather(comm, part)  # [P, 2, kept]: one collective for the statistics
        lse = torch.logsumexp(stats[:, 0], 0)
        target = stats[:, 1].sum(0)
        ctx.save_for_backward(h, weight, y, keep, lse)
        ctx.shard, ctx.softcap, ctx.z_loss, ctx.N = shard, softcap, z_loss, N
        ctx.impl, ctx.filter_eps = impl, filter_eps
        ctx.autocast = _autocast_state(h.device)
        per_token = lse - target + (z_loss * lse * lse if z_loss else 0)
        every = torch.zeros(comm.world * N, dtype=torch.float32, device=h.device).index_copy_(0, keep, per_token)
        return every[comm.rank * N:(comm.rank + 1) * N].clone()

    @staticmethod
    def backward(ctx, grad):
        h, weight, y, keep, lse = ctx.saved_tensors
        comm = communicator(ctx.shard.group)
        g = _all_gather(comm, grad.float().contiguous()).flatten()[keep]  # every token's upstream gradient
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        with _replay(ctx.autocast):
            dh = shard_grads(h, weight, y, lse, g, ctx.z_loss, ctx.softcap, dw, ctx.impl, ctx.filter_eps)
        every = torch.zeros((comm.world * ctx.N, h.shape[1]), dtype=torch.float32, device=h.device)
        every.index_copy_(0, keep, dh)
        dhidden = _reduce_scatter(comm, every.view(comm.world, ctx.N, -1))
        return dhidden.to(h.dtype), dw.to(weight.dtype), None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shard: VocabShard,
                         variant: str = "stream", ignore_index: int = -100, reduction: str = "sum",
                         softcap: float | None = None, z_loss: float = 0.0, impl: str = "torch",
                         filter_eps: float | str | None = None) -> torch.Tensor:
    """Cross-entropy of this rank's tokens, hidden [N, D] and labels [N] (global ids), against the
    vocabulary whose rows [shard.start, shard.stop) are `weight`; collective over shard.group
    (every rank calls it with the same N). Equals kernels.loss.linear_cross_entropy with the full
    weight. reduction: sum, mean (over this rank's valid labels) or none (fp32 per token).
    impl: the per-shard kernels, torch (chunked, exact) or triton (kernels/cce.py; filter_eps as
    its gradient filtering: None computes every tile)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    if impl not in SHARD_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {SHARD_IMPLS}")
    fn = _StreamLoss if variant == "stream" else _GatherLoss
    per_token = fn.apply(hidden, weight, labels, shard, ignore_index, softcap, z_loss, impl, filter_eps)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


# --- the embedding --------------------------------------------------------------------------------
class _StreamEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, shard):
        comm = communicator(shard.group)
        out = torch.zeros((ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=weight.device)
        cur = _padded(weight.detach(), shard.rows)
        for step in range(shard.world):
            start, n = shard.owner((comm.rank - step) % shard.world)
            pending, nxt = _ring(comm, cur, step, "vocab embedding")
            mine = ((ids >= start) & (ids < start + n)).nonzero().squeeze(1)
            out[mine] = cur[ids[mine] - start]
            if pending is not None:
                pending.wait()
                cur = nxt
        ctx.save_for_backward(ids)
        ctx.shard, ctx.shape, ctx.dtype = shard, weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        shard, comm = ctx.shard, communicator(ctx.shard.group)
        acc_recv = None
        for step in range(shard.world):
            start, n = shard.owner((comm.rank - step) % shard.world)
            if acc_recv is None:
                acc = torch.zeros((shard.rows, ctx.shape[1]), dtype=torch.float32, device=grad.device)
            else:
                acc_recv[0].wait()
                acc = acc_recv[1]
            mine = ((ids >= start) & (ids < start + n)).nonzero().squeeze(1)
            acc.index_add_(0, ids[mine] - start, grad[mine].float())
            incoming = torch.empty_like(acc)
            acc_recv = (comm.exchange([(acc, comm.next)], [(incoming, comm.prev)], channel="return",
                                      what=f"vocab embedding dw {step}"), incoming)
        acc_recv[0].wait()
        return None, acc_recv[1][:ctx.shape[0]].to(ctx.dtype), None


class _GatherEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, shard):
        comm = communicator(shard.group)
        every = _all_gather(comm, ids)  # [P, N]
        mine = (every >= shard.start) & (every < shard.stop)
        rows = torch.zeros((*every.shape, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        rows[mine] = weight[every[mine] - shard.start]
        ctx.save_for_backward(every, mine)
        ctx.shard, ctx.shape, ctx.dtype = shard, weight.shape, weight.dtype
        return _reduce_scatter(comm, rows)

    @staticmethod
    def backward(ctx, grad):
        every, mine = ctx.saved_tensors
        comm = communicator(ctx.shard.group)
        grads = _all_gather(comm, grad.contiguous())  # [P, N, D]
        dw = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)
        dw.index_add_(0, every[mine] - ctx.shard.start, grads[mine].float())
        return None, dw.to(ctx.dtype), None


def embedding(ids: torch.Tensor, weight: torch.Tensor, shard: VocabShard, variant: str = "stream") -> torch.Tensor:
    """F.embedding(ids, full weight) from this rank's rows `weight` (collective over shard.group;
    every rank calls it with the same number of ids). ids of any shape -> [*ids.shape, D]."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    fn = _StreamEmbedding if variant == "stream" else _GatherEmbedding
    return fn.apply(ids.reshape(-1), weight, shard).view(*ids.shape, weight.shape[1])


# --- the byte model behind `auto` ------------------------------------------------------------------
def bytes_per_rank(variant: str, layer: str, tokens: int, vocab_size: int, hidden: int, world: int,
                   weight_bytes: int = 4, hidden_bytes: int = 4) -> int:
    """Bytes one rank sends for one forward + backward of `layer` (head or embedding) with
    `tokens` tokens on each rank of a group of `world`."""
    P, D, c = world, hidden, -(-vocab_size // world)
    if P == 1:
        return 0
    if variant == "stream":  # shards travel P-1 hops (twice for the head); the fp32 accumulator P hops
        weight_hops = 2 if layer == "head" else 1
        return (P - 1) * c * D * weight_bytes * weight_hops + P * c * D * 4
    if layer == "head":  # hidden states and labels out, statistics [2, tokens*P], upstream gradients, dH (fp32) back
        return (P - 1) * (tokens * D * hidden_bytes + tokens * 8 + 2 * P * tokens * 4 + tokens * 4 + tokens * D * 4)
    return (P - 1) * (tokens * 8 + tokens * D * weight_bytes + tokens * D * weight_bytes)  # ids, rows, gradients


def predict_seconds(variant: str, tokens: int, vocab_size: int, hidden: int, world: int, flops_per_s: float,
                    link_bytes_per_s: float, weight_bytes: int = 4, hidden_bytes: int = 4,
                    latency_s: float = 20e-6) -> float:
    """Time of the embedding + loss head's forward and backward on one rank. Compute is the same
    in both variants (8 N V D / P per rank for the head with the recompute, a lookup for the
    embedding); gather's collectives wait in line with it, stream's transfers overlap it step by
    step (each of P steps costs the larger of its compute and its transfer)."""
    P = world
    head_flops = 8.0 * tokens * vocab_size * hidden
    compute_s = head_flops / flops_per_s
    transfers = {layer: bytes_per_rank(variant, layer, tokens, vocab_size, hidden, P, weight_bytes, hidden_bytes)
                 / link_bytes_per_s for layer in ("head", "embedding")}
    if variant == "gather":
        return compute_s + sum(transfers.values()) + 6 * (P - 1) * latency_s
    per_step = compute_s / P
    head = P * max(per_step, transfers["head"] / P)  # the embedding's lookups are too small to hide it
    return head + transfers["embedding"] + 4 * P * latency_s


def choose(tokens: int, vocab_size: int, hidden: int, world: int, flops_per_s: float, link_bytes_per_s: float,
           weight_bytes: int = 4, hidden_bytes: int = 4, latency_s: float = 20e-6) -> str:
    """`auto`: the variant the byte model predicts faster (stream on a tie)."""
    times = {v: predict_seconds(v, tokens, vocab_size, hidden, world, flops_per_s, link_bytes_per_s, weight_bytes,
                                hidden_bytes, latency_s) for v in VARIANTS}
    return "gather" if times["gather"] < times["stream"] else "stream"


# --- applied to a model ------------------------------------------------------------------------------
class VocabParallel:
    """How a model's vocabulary layers run: the shard, the variant (or auto) and what auto needs."""

    def __init__(self, shard: VocabShard, variant: str, hidden: int, flops_per_s: float = 1e14,
                 link_bytes_per_s: float = 25e9, impl: str = "torch", filter_eps=None) -> None:
        if variant not in VARIANTS + ("auto",):
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS + ('auto',)}")
        self.shard, self.variant, self.hidden = shard, variant, hidden
        self.impl, self.filter_eps = impl, filter_eps  # the per-shard kernels (linear_cross_entropy)
        self.flops_per_s, self.link_bytes_per_s = flops_per_s, link_bytes_per_s
        self.last = None  # the variant of the last call (for the run log and metrics)
        self.device_mesh, self.placements = None, ()  # how a checkpoint describes the shards (new_groups)

    def pick(self, tokens: int, weight: torch.Tensor, hidden_bytes: int) -> str:
        v = self.variant
        if v == "auto":
            v = choose(tokens, self.shard.vocab_size, self.hidden, self.shard.world, self.flops_per_s,
                       self.link_bytes_per_s, weight.element_size(), hidden_bytes)
        self.last = v
        return v


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding over this rank's rows: `weight` is the shard (same name, so state dicts keep the key)."""

    def __init__(self, weight: torch.Tensor, vp: VocabParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vp = vp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        variant = self.vp.pick(ids.numel(), self.weight, self.weight.element_size())
        return embedding(ids, self.weight, self.vp.shard, variant)


class VocabParallelHead(nn.Module):
    """The untied output layer's shard (`lm_head.weight`); the loss reads it as the model's output weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def loss_fn(vp: VocabParallel, ignore_index: int = -100, softcap: float | None = None, z_loss: float = 0.0):
    """The model's loss callable (hidden [N, D], weight shard, labels [N]) -> summed loss."""

    def loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        variant = vp.pick(hidden.shape[0], weight, hidden.element_size())
        return linear_cross_entropy(hidden, weight, labels, vp.shard, variant, ignore_index, "sum", softcap, z_loss,
                                    vp.impl, vp.filter_eps)

    return loss


def shard_model(model: nn.Module, vp: VocabParallel, loss) -> list[nn.Parameter]:
    """Replaces the model's embedding (and untied output layer) by their shards and its loss by
    `loss`; returns the sharded parameters (one when tied: one weight for both uses)."""
    # a frozen weight (LoRA's base, train/adapter.py) stays frozen as its shard
    full_in = model.model.embed_tokens.weight
    model.model.embed_tokens = VocabParallelEmbedding(shard_rows(full_in.detach(), vp.shard), vp)
    model.model.embed_tokens.weight.requires_grad_(full_in.requires_grad)
    params = [model.model.embed_tokens.weight]
    if hasattr(model, "lm_head"):
        full_out = model.lm_head.weight
        model.lm_head = VocabParallelHead(shard_rows(full_out.detach(), vp.shard))
        model.lm_head.weight.requires_grad_(full_out.requires_grad)
        params.append(model.lm_head.weight)
    model.loss_fn = loss
    model.vocab_parallel = vp
    model.whole_output_weight = lambda: full_weight(model.output_weight, vp.shard)
    return params


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The vocabulary-sharded parameters of a model (none when it is not vocabulary parallel)."""
    found = []
    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, VocabParallelHead)):
            found.append(module.weight)
    return found


def grad_norm_squared(params, shard: VocabShard) -> torch.Tensor:
    """Sum of squared gradient entries over the whole (unsharded) weights: the shards' sums added
    over the group (collective)."""
    params = list(params)
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    if shard.group is not None:
        dist.all_reduce(total, group=shard.group)
    return total




# --- groups and checkpoints ------------------------------------------------------------------------
def new_groups(world: int, size: int, rank: int):
    """The vocabulary groups: `size` consecutive ranks each (the sp groups; one group of every rank
    under FSDP2), with their return channels. Collective: every rank makes every group, in order.
    Returns this rank's group and the DeviceMesh + placements a checkpoint describes the shards by
    (replicated over the groups, Shard(0) within one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mine = None
    for start in range(0, world, size):
        group = p2p.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if size == world:
        return mine, init_device_mesh(device_type, (world,), mesh_dim_names=("vocab",)), (Shard(0),)
    mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("vocab_replica", "vocab"))
    return mine, mesh, (Replicate(), Shard(0))


def sharded_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """State-dict name -> parameter of each vocabulary-sharded weight."""
    sharded = {id(p) for p in sharded_parameters(model)}
    return {name: p for name, p in model.named_parameters() if id(p) in sharded}


def as_dtensors(model: nn.Module, model_state: dict, optim_state: dict) -> list[tuple[dict, str]]:
    """Wraps the shards in a model and a flattened optimizer state dict as DTensors over the
    vocabulary mesh (in place, sharing storage), so torch.distributed.checkpoint saves each rank's
    rows once and loads them resharded (or whole, in one process: `longctx export`). Returns what
    it wrapped, for `as_local`."""
    vp = getattr(model, "vocab_parallel", None)
    if vp is None:
        return []
    from torch.distributed.tensor import DTensor

    wrapped = []
    for name, p in sharded_names(model).items():
        shape = torch.Size((vp.shard.vocab_size, p.shape[1]))
        for state, key in [(model_state, name)] + [(optim_state, k) for k in optim_state
                                                   if k.startswith(f"state.{name}.")]:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                state[key] = DTensor.from_local(value, vp.device_mesh, vp.placements, run_check=False, shape=shape,
                                                stride=(p.shape[1], 1))
                wrapped.append((state, key))
    return wrapped


def as_local(wrapped: list[tuple[dict, str]]) -> None:
    for state, key in wrapped:
        state[key] = state[key].to_local()
