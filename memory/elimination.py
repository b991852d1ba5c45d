"""LeMo token elimination: per layer, the token blocks that receive little attention skip the
layer (Wang et al., "LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning",
arXiv 2501.09767; the same system as Jenga, USENIX ATC'25).

In a layer that eliminates, the layer input is scored in blocks of `block_tokens` tokens; the
kept blocks' tokens are gathered (`index_select`) and the whole block (norm, attention, MLP) runs
on them alone, with RoPE at their original positions; their outputs are copied back into the
residual stream (`index_copy`), and the eliminated tokens pass to the next layer unchanged. The
next layer scores every token again: elimination is per layer, never permanent. Eliminated tokens
are dropped as queries and as keys/values, so they cost that layer neither compute nor saved
activations; with `skip_mlp: false` they still go through the MLP (attention alone is sparse).

Score of a key block n (the artifact's ground truth, `Pairshoe/Jenga-AE`): split the query-key
score matrix into block_tokens x block_tokens tiles; a tile's value is the maximum over its
entries of sum_h ReLU(q_i . k_j) / H (pre-RoPE q and k, the layer's own projections after its
input norm; GQA: each query head against its key head); the key block's score is the sum of its
tiles over all query blocks (not causal: future queries count too, as in the artifact). The 1/sqrt(d)
scale is left out: it does not change the ranking.

Selection keeps the same number of whole blocks in each of the 2 x sp zigzag chunks of the
sequence (one chunk at sp 1): the kept tokens stay in order inside every chunk, so every
sequence-parallel schedule runs unchanged on the shorter shards, the zigzag balance holds and the
ring messages shrink uniformly. A chunk's trailing partial block (a length that is not a multiple
of block_tokens) is always kept. Under sequence parallelism the scores are global: each rank
scores its queries against every rank's keys (one all-gather of pre-RoPE keys) and the partial
sums are added (one all-reduce of the block scores), so every rank sees the scores one process
would compute.

References: `block_scores_reference` (dense, the whole score matrix) beside the tiled
`block_scores`; tests compare the eliminated model with `reference_layer`, the dense layer that
masks the same blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels.capability import has_triton_gpu
from . import accounting
from .predictors import recall

BLOCK_TOKENS = 64  # the artifact's block
SCORE_TILE_TOKENS = 1024  # query/key tokens per tile of the blockwise score (a multiple of the block)


# --- the score ------------------------------------------------------------------------------------
def _grouped(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """q [B, S, Hq, D] -> [B, S, Hkv, G, D]: the query heads that share each key head."""
    B, S, Hq, D = q.shape
    return q.view(B, S, heads_kv, Hq // heads_kv, D)


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """t [B, S, ...] zero padded on dim 1 to `length`."""
    if t.shape[1] == length:
        return t
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, block_tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """Dense reference: q [B, Sq, Hq, D], k [B, Sk, Hkv, D] (pre-RoPE) -> [B, ceil(Sk / block)] scores of
    the key blocks, from the whole [B, Sq, Sk] matrix of sum_h ReLU(q . k) / Hq. Zero padding to whole
    blocks changes no tile maximum (every entry is >= 0)."""
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    kk = k.float().repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kk).relu().sum(1) / Hq  # [B, Sq, Sk]
    nq, nk = math.ceil(Sq / block_tokens), math.ceil(k.shape[1] / block_tokens)
    s = torch.nn.functional.pad(s, (0, nk * block_tokens - s.shape[2], 0, nq * block_tokens - Sq))
    return s.view(B, nq, block_tokens, nk, block_tokens).amax(dim=(2, 4)).sum(1)


def score_impl(device: torch.device, block_tokens: int) -> str:
    """triton on a CUDA device with Triton (block_tokens a power of two >= 16), else torch."""
    power = block_tokens >= 16 and not block_tokens & (block_tokens - 1)
    return "triton" if device.type == "cuda" and power and has_triton_gpu() else "torch"


def block_scores(q: torch.Tensor, k: torch.Tensor, block_tokens: int = BLOCK_TOKENS,
                 tile_tokens: int = SCORE_TILE_TOKENS, impl: str = "auto") -> torch.Tensor:
    """The same scores without the whole matrix: `triton` (kernels/block_score.py, one program per
    key block) or `torch` tile by tile (at most [B, Hq, tile, tile] fp32 live); auto = score_impl.
    Both sequences are cut into whole blocks (zero padded, as the reference)."""
    if (score_impl(q.device, block_tokens) if impl == "auto" else impl) == "triton":
        from ..kernels.block_score import block_scores_triton

        return block_scores_triton(q, k, block_tokens)
    tile = max(block_tokens, tile_tokens // block_tokens * block_tokens)
    out = torch.zeros(q.shape[0], math.ceil(k.shape[1] / block_tokens), dtype=torch.float32, device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # fp32 products even inside the trainer's autocast
        _accumulate_scores(out, q, k, block_tokens, tile)
    return out


def _accumulate_scores(out, q, k, block_tokens, tile):
    B, Hq, Hkv = q.shape[0], q.shape[2], k.shape[2]
    nq, nk = math.ceil(q.shape[1] / block_tokens), out.shape[1]
    for ks in range(0, nk * block_tokens, tile):
        kt = _pad_to(k[:, ks:ks + tile].float(), min(tile, nk * block_tokens - ks))
        for qs in range(0, nq * block_tokens, tile):
            qt = _pad_to(q[:, qs:qs + tile].float(), min(tile, nq * block_tokens - qs))
            s = torch.einsum("bihgd,bjhd->bhgij", _grouped(qt, Hkv), kt).relu_().sum((1, 2)).div_(Hq)
            tq, tk = s.shape[1] // block_tokens, s.shape[2] // block_tokens
            out[:, ks // block_tokens:ks // block_tokens + tk] += (
                s.view(B, tq, block_tokens, tk, block_tokens).amax(dim=(2, 4)).sum(1))


# --- the selection --------------------------------------------------------------------------------
def kept_blocks(keep_ratio: float, full_blocks: int) -> int:
    """Whole blocks a chunk keeps (at least one, round half up)."""
    return min(full_blocks, max(1, math.floor(keep_ratio * full_blocks + 0.5)))


def block_spans(length: int, chunks: int, block_tokens: int) -> list[list[tuple[int, int]]]:
    """Per chunk, the (start, stop) spans of its blocks: whole blocks from the chunk's start, then
    the partial one if the chunk's length is not a multiple of block_tokens."""
    size = length // chunks
    spans = []
    for c in range(chunks):
        start = c * size
        spans.append([(s, min(s + block_tokens, start + size)) for s in range(start, start + size, block_tokens)])
    return spans


def select(scores: torch.Tensor, length: int, chunks: int, keep_ratio: float,
           block_tokens: int = BLOCK_TOKENS) -> torch.Tensor | None:
    """scores [B, blocks] (blocks in `block_spans` order) -> the kept token indices [B, kept], in
    order, the same count in every chunk; None when every token is kept (the layer runs dense)."""
    spans = block_spans(length, chunks, block_tokens)
    full = sum(1 for s, e in spans[0] if e - s == block_tokens)
    k = kept_blocks(keep_ratio, full)
    if full == 0 or k == full:
        return None
    B = scores.shape[0]
    rows, first = [], 0
    for chunk in spans:
        whole = scores[:, first:first + full]
        top = whole.topk(k, dim=1).indices.sort(dim=1).values  # [B, k] block numbers inside the chunk
        start = chunk[0][0]
        tokens = (start + top[:, :, None] * block_tokens + torch.arange(block_tokens, device=scores.device)).flatten(1)
        tail = [torch.arange(s, e, device=scores.device).expand(B, e - s) for s, e in chunk[full:]]
        rows.append(torch.cat([tokens, *tail], dim=1))
        first += len(chunk)
    return torch.cat(rows, dim=1)


def spans_to_blocks(x: torch.Tensor, spans: list[list[tuple[int, int]]], block_tokens: int) -> torch.Tensor:
    """x [B, S, ...] -> [B, blocks * block_tokens, ...]: every block padded to block_tokens with zeros,
    so the tiled score sees whole blocks in `block_spans` order; x itself (no copy) when every
    block is whole."""
    if all(e - s == block_tokens for chunk in spans for s, e in chunk):
        return x
    parts = []
    for chunk in spans:
        s, e = chunk[0][0], chunk[-1][1]
        parts.append(_pad_to(x[:, s:e], len(chunk) * block_tokens))
    return torch.cat(parts, dim=1)


# --- the policy -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Elimination:
    """memory.elimination resolved for one model: the keep ratio of each layer (1 = dense)."""

    keep: tuple[float, ...]
    block_tokens: int = BLOCK_TOKENS
    skip_mlp: bool = True
    predictors: object | None = None  # memory/predictors.Predictors: source predictor; None: exact scores

    @staticmethod
    def auto_dense_layers(num_layers: int) -> list[int]:
        """The artifact's dense layers scaled to the model: 0-14 and 31 of Llama's 32 are the first
        num_layers // 2 - 1 layers and the last."""
        return sorted(set(range(max(num_layers // 2 - 1, 0))) | {num_layers - 1})

    @classmethod
    def of(cls, num_layers: int, keep_ratio: float | list[float], dense_layers: list[int] | str = "auto",
           block_tokens: int = BLOCK_TOKENS, skip_mlp: bool = True, predictors=None) -> Elimination:
        dense = cls.auto_dense_layers(num_layers) if dense_layers == "auto" else list(dense_layers)
        if isinstance(keep_ratio, list):
            if len(keep_ratio) != num_layers:
                raise ValueError(f"keep_ratio has {len(keep_ratio)} entries for {num_layers} layers")
            ratios = list(keep_ratio)
        else:
            ratios = [keep_ratio] * num_layers
        keep = tuple(1.0 if i in dense else float(r) for i, r in enumerate(ratios))
        return cls(keep, block_tokens, skip_mlp, predictors)

    @property
    def active(self) -> bool:
        return any(r < 1.0 for r in self.keep)


# --- the wrapped block ----------------------------------------------------------------------------
def _projections(block: nn.Module, x: torch.Tensor, keys: bool = True):
    """Pre-RoPE q [B, S, Hq, D] (and k [B, S, Hkv, D]) of the block's input x, as attention sees them."""
    attn = block.self_attn
    B, S, _ = x.shape
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(B, S, attn.num_heads, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    if not keys:
        return q
    k = attn.k_proj(h).view(B, S, attn.num_kv_heads, attn.head_dim)
    return q, attn.k_norm(k) if hasattr(attn, "k_norm") else k


class SequenceGroup:
    """Where a layer's scores come from: the sp degree this step runs at and its group (set by the
    trainer through the model's SequenceParallelAttention), or one process."""

    def __init__(self, sp_attention=None) -> None:
        self.sp_attention = sp_attention

    def current(self) -> tuple[int, object | None]:
        a = self.sp_attention
        if a is None or a.sp == 1:
            return 1, None
        return a.sp, a.groups[a.sp]


def global_scores(block: nn.Module, x: torch.Tensor, spans, block_tokens: int, sp: int, group,
                  tile_tokens: int = SCORE_TILE_TOKENS * 4) -> torch.Tensor:
    """The key blocks' scores [B, blocks] of this rank's tokens against every query of the sequence.
    The keys are projected once (the whole local sequence: Hkv x D per token), the queries a tile
    of `tile_tokens` at a time (a score is a sum over query blocks, so tiles add up)."""
    xb = spans_to_blocks(x, spans, block_tokens)  # a copy only when some block is partial
    k = spans_to_blocks(_projections(block, x)[1], spans, block_tokens) if xb is x else \
        _projections(block, xb)[1]
    if xb is not x:  # zero-padded rows of x do not project to zero (biases, norms): zero their keys
        k = k * _whole_mask(spans, block_tokens, k)
    keys = [k]
    if sp > 1:
        keys = [torch.empty_like(k) for _ in range(sp)]
        dist.all_gather(keys, k.contiguous(), group=group)
    tile = max(block_tokens, tile_tokens // block_tokens * block_tokens)
    out = torch.zeros(len(keys), k.shape[0], k.shape[1] // block_tokens, dtype=torch.float32, device=x.device)
    for qs in range(0, xb.shape[1], tile):
        q = _projections(block, xb[:, qs:qs + tile], keys=False)
        if xb is not x:
            q = q * _whole_mask(spans, block_tokens, k)[:, qs:qs + tile]
        for r, kr in enumerate(keys):
            out[r] += block_scores(q, kr, block_tokens)
    if sp == 1:
        return out[0]
    dist.all_reduce(out, group=group)
    return out[dist.get_rank(group)]


def predicted_scores(block: nn.Module, predictor, x: torch.Tensor, spans, block_tokens: int, sp: int,
                     group) -> torch.Tensor:
    """The key blocks' scores [B, blocks] from the layer's pattern predictor (memory/predictors.py), on
    the same normed input the layer's projections read; fp32. Under sequence parallelism one
    all-reduce of the predictors' query sums makes them the scores of the whole sequence."""
    with torch.autocast(x.device.type, enabled=False):
        h = spans_to_blocks(block.input_layernorm(x).float(), spans, block_tokens)
        whole = all(e - s == block_tokens for chunk in spans for s, e in chunk)
        valid = None if whole else _whole_mask(spans, block_tokens, h).flatten()
        return predictor.scores(h, sp, group, valid)


def _whole_mask(spans, block_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """[1, blocks * block_tokens, 1, 1]: 1 at the positions of real tokens, 0 at a partial block's padding."""
    mask = torch.zeros(sum(len(c) for c in spans) * block_tokens, dtype=like.dtype, device=like.device)
    at = 0
    for chunk in spans:
        for s, e in chunk:
            mask[at:at + e - s] = 1
            at += block_tokens
    return mask[None, :, None, None]


class _PutRows(torch.autograd.Function):
    """x [N, H] with rows `index` replaced by y [n, H]: `index_copy` without keeping y for backward
    (autograd's index_copy saves its source, a kept-token activation per layer for nothing)."""

    @staticmethod
    def forward(ctx, x, index, y):
        ctx.save_for_backward(index)
        return x.index_copy(0, index, y)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_fill(0, index, 0), None, grad.index_select(0, index)


class EliminatingLayer:
    """One block's elimination: decides the kept tokens and runs the block's forward on them.

    In eval mode the block runs dense (the exported model is dense) unless `in_eval` is set. A
    forward without a graph in training mode is a checkpointed segment's first pass
    (memory/offload.segment): its kept indices are queued and its recomputation in backward takes
    them instead of scoring again, whose inputs come from another code path and could tip a
    near-tie the other way (a different graph than the forward's)."""

    def __init__(self, block: nn.Module, index: int, keep_ratio: float, policy: Elimination,
                 group: SequenceGroup) -> None:
        self.block, self.index, self.keep_ratio, self.policy, self.group = block, index, keep_ratio, policy, group
        self.inner = block.forward
        self.kept_tokens = self.tokens = 0  # training forwards since `take_counts` (a ratio: recomputation counts twice)
        self.last_kept: torch.Tensor | None = None
        self.in_eval = False
        self.scored = 0  # times the blocks were scored (tests)
        self._queued: list[tuple[tuple, torch.Tensor | None]] = []
        predictors = policy.predictors
        self.predictor = None if predictors is None else predictors.layers[index]
        self.measure = False  # source predictor: the next scoring also computes the exact scores (recall)
        self.recall_hits = self.recall_total = 0

    def _choose(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.block.training:  # in_eval: no recomputation follows
            return self.kept(x)
        if not torch.is_grad_enabled():
            idx = self.kept(x)
            self._queued.append((tuple(x.shape), idx))
            return idx
        if self._queued:  # the recomputation of a checkpointed forward: its blocks
            shape, idx = self._queued.pop(0)
            if shape == tuple(x.shape):
                return idx
            self._queued.clear()  # not that forward's recomputation: what is queued is stale
        return self.kept(x)

    def kept(self, x: torch.Tensor) -> torch.Tensor | None:
        sp, group = self.group.current()
        chunks = 1 if sp == 1 else 2
        length, bt = x.shape[1], self.policy.block_tokens
        spans = block_spans(length, chunks, bt)
        full = sum(1 for s, e in spans[0] if e - s == bt)
        if length % chunks or full == 0 or kept_blocks(self.keep_ratio, full) == full:
            return None  # nothing to eliminate at this length: the layer runs dense
        self.scored += 1
        with torch.no_grad():
            if self.predictor is None:
                return select(global_scores(self.block, x, spans, bt, sp, group), length, chunks, self.keep_ratio, bt)
            idx = select(predicted_scores(self.block, self.predictor, x, spans, bt, sp, group), length, chunks,
                         self.keep_ratio, bt)
            if self.measure:  # the recall of the kept blocks against the exact scores' choice
                self.measure = False
                exact = select(global_scores(self.block, x, spans, bt, sp, group), length, chunks, self.keep_ratio, bt)
                hits, total = recall(idx, exact)
                self.recall_hits += hits
                self.recall_total += total
        return idx

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        if not (self.block.training or self.in_eval):
            return self.inner(x, cos, sin)
        idx = self.last_kept = self._choose(x)
        if torch.is_grad_enabled():
            self.tokens += B * S
            self.kept_tokens += B * S if idx is None else idx.numel()
        if idx is None:
            return self.inner(x, cos, sin)
        flat = (idx + torch.arange(B, device=x.device)[:, None] * S).flatten()
        xk = x.reshape(B * S, H).index_select(0, flat).view(B, -1, H)
        cosk, sink = (t.expand(B, -1, -1).reshape(B * S, t.shape[-1]).index_select(0, flat).view(B, -1, t.shape[-1])
                      for t in (cos, sin))
        if self.policy.skip_mlp:
            if torch.is_grad_enabled() and hasattr(self.inner, "memo_layer"):
                # memory/offload keeps the block's cos/sin until backward outside autograd's saved
                # tensors: for the whole-sequence ones that is shared, these gathered copies are this layer's
                accounting.record("device", 2 * cosk.untyped_storage().nbytes())
            yk = self.inner(xk, cosk, sink)
            return _PutRows.apply(x.reshape(B * S, H), flat, yk.reshape(-1, H)).view(B, S, H)
        blk = self.block  # attention on the kept tokens, the MLP on every token
        q, k, v = blk.before_attention(xk, cosk, sink)
        hk = xk + blk.self_attn.o_proj(blk.attention_fn(q, k, v).flatten(2))
        h = _PutRows.apply(x.reshape(B * S, H), flat, hk.reshape(-1, H)).view(B, S, H)
        return h + blk.mlp(blk.post_attention_layernorm(h))


def take_counts(layers: list[EliminatingLayer]) -> dict:
    """Kept-token ratio per eliminating layer over the training forwards since the last call (for
    metrics.jsonl / W&B), and their mean over all layers (dense layers count 1); resets the counts."""
    out, recalls = {}, {}
    for lay in layers:
        if lay.tokens:
            out[f"elimination_kept_ratio/layers.{lay.index}"] = lay.kept_tokens / lay.tokens
        if lay.recall_total:
            recalls[f"elimination_predictor_recall/layers.{lay.index}"] = lay.recall_hits / lay.recall_total
        lay.kept_tokens = lay.tokens = lay.recall_hits = lay.recall_total = 0
    if out and layers:
        n = len(layers[0].policy.keep)
        out["elimination_kept_ratio"] = (n - len(out) + sum(out.values())) / n
    if recalls:
        recalls["elimination_predictor_recall_min"] = min(recalls.values())
    return out | recalls


def measure_recall(layers: list[EliminatingLayer]) -> None:
    """Source predictor: each layer's next scoring also computes the exact scores, and `take_counts`
    reports the share of the exact choice's tokens the predictors kept."""
    for lay in layers:
        lay.measure = lay.predictor is not None


def wrap(block: nn.Module, policy: Elimination, index: int, group: SequenceGroup | None = None) -> EliminatingLayer:
    """Wraps `block.forward` in place (parameter names unchanged) with layer `index`'s keep ratio."""
    lay = EliminatingLayer(block, index, policy.keep[index], policy, group or SequenceGroup())
    block.forward = lay.forward
    return lay


def apply(model: nn.Module, policy: Elimination, sp_attention=None) -> list[EliminatingLayer]:
    """Wraps every block whose keep ratio is below 1. Applied after memory.policy's wrapping, so
    memory/offload.py's block runs on the kept tokens only; sets and returns model.elimination."""
    group = SequenceGroup(sp_attention)
    model.elimination = [wrap(block, policy, i, group) for i, block in enumerate(model.model.layers)
                         if policy.keep[i] < 1.0]
    return model.elimination


# --- the MLP's saved channels (the artifact's MLP sparsity) -----------------------------------------
def saved_channel_count(fraction: float, intermediate: int) -> int:
    """Intermediate channels an MLP saves for backward (at least one, round half up)."""
    return min(intermediate, max(1, math.floor(fraction * intermediate + 0.5)))


NORM_TILE_TOKENS = 4096  # tokens per fp32 tile of the channel norms (bounds their transient)


def chosen_channels(a: torch.Tensor, u: torch.Tensor, count: int, group=None) -> torch.Tensor:
    """The `count` channels (sorted) with the largest ||silu(gate)[:, c]|| + ||up[:, c]|| over every token
    of a [.., I] and u [.., I] (and of the sp group's other ranks: one all-reduce of 2 x I sums). The
    squares are summed in fp32 a tile of tokens at a time."""
    a, u = a.reshape(-1, a.shape[-1]), u.reshape(-1, u.shape[-1])
    squares = torch.zeros(2, a.shape[1], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], NORM_TILE_TOKENS):
        squares[0] += a[s:s + NORM_TILE_TOKENS].float().square().sum(0)
        squares[1] += u[s:s + NORM_TILE_TOKENS].float().square().sum(0)
    if group is not None:
        dist.all_reduce(squares, group=group)
    return squares.sqrt().sum(0).topk(count).indices.sort().values


class _SavedChannelsSwiGLU(torch.autograd.Function):
    """down(silu(x Wg^T) * (x Wu^T)) with frozen weights: forward is the dense MLP's (the same ops);
    backward keeps only gate and up of the chosen channels, so dx = d/dx of the MLP restricted to
    them (the other channels' share of the input gradient is dropped; the weights get none)."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, count, group, owner):
        g, u = F.linear(x, wg), F.linear(x, wu)
        a = F.silu(g)
        out = F.linear(a * u, wd)
        idx = chosen_channels(a, u, count, group)
        owner.last_channels = idx
        ctx.save_for_backward(g.index_select(-1, idx), u.index_select(-1, idx), idx, wg, wu, wd)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        gk, uk, idx, wg, wu, wd = ctx.saved_tensors
        dt = gk.dtype  # the forward's compute dtype (bf16 under autocast); elementwise work in fp32
        dc = (dy.to(dt) @ wd.index_select(1, idx).to(dt)).float()
        g = gk.float()
        s = torch.sigmoid(g)
        dg = (dc * uk.float() * s * (1 + g * (1 - s))).to(dt)
        du = (dc * g * s).to(dt)
        dx = (dg @ wg.index_select(0, idx).to(dt)).float() + (du @ wu.index_select(0, idx).to(dt)).float()
        return dx.to(ctx.x_dtype), None, None, None, None, None, None


class SavedChannelsMLP:
    """One MLP with memory.elimination.mlp_channels < 1: in training with a graph it runs
    `_SavedChannelsSwiGLU`; otherwise (eval, no grad) the dense MLP. `last_channels` holds the
    last choice (tests)."""

    def __init__(self, mlp: nn.Module, fraction: float, group: SequenceGroup) -> None:
        self.mlp, self.inner, self.group = mlp, mlp.forward, group
        self.count = saved_channel_count(fraction, mlp.gate_proj.out_features)
        self.last_channels: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        if not (m.training and torch.is_grad_enabled()) or self.count == m.gate_proj.out_features:
            return self.inner(x)
        return _SavedChannelsSwiGLU.apply(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, self.count,
                                          self.group.current()[1], self)


def apply_mlp_channels(model: nn.Module, fraction: float, sp_attention=None) -> list[SavedChannelsMLP]:
    """Wraps every block's `mlp.forward` in place; sets and returns model.mlp_channels."""
    group = SequenceGroup(sp_attention)
    model.mlp_channels = []
    for block in model.model.layers:
        if any(p.requires_grad for p in block.mlp.parameters()):
            raise ValueError("the MLP weights are trained; saved channels need them frozen")
        wrapped = SavedChannelsMLP(block.mlp, fraction, group)
        block.mlp.forward = wrapped.forward
        model.mlp_channels.append(wrapped)
    return model.mlp_channels


def reference_mlp_channels(mlp: nn.Module, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The saved-channel MLP by plain autograd: the dense MLP's value, with the gradient of the MLP
    whose channels outside `channels` are multiplied by 0."""
    mask = torch.zeros(mlp.gate_proj.out_features, dtype=x.dtype, device=x.device)
    mask[channels] = 1
    masked = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)
    with torch.no_grad():
        dense = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return dense + (masked - masked.detach())


# --- the reference --------------------------------------------------------------------------------
def reference_layer(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kept: torch.Tensor, skip_mlp: bool = True) -> torch.Tensor:
    """The dense block with the eliminated tokens masked: attention on the full sequence with a mask
    (causal, and only kept keys), the eliminated queries' attention output and MLP output zeroed, so an
    eliminated token leaves the layer unchanged. kept: [B, k] token indices. Single process, fp32."""
    B, S, H = x.shape
    keep = torch.zeros(B, S, dtype=torch.bool, device=x.device)
    keep.scatter_(1, kept, True)
    attn = block.self_attn
    q, k, v = attn.qkv(block.input_layernorm(x), cos, sin)
    G = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    allowed = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None] & keep[:, None, :]  # [B, Sq, Sk]
    allowed = allowed | ~keep[:, :, None]  # an eliminated query sees anything (its output is zeroed)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(attn.head_dim)
    p = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    a = torch.einsum("bhij,bjhd->bihd", p, v)
    h = x + attn.o_proj(a.flatten(2)) * keep[..., None]
    m = block.mlp(block.post_attention_layernorm(h))
    return h + (m * keep[..., None] if skip_mlp else m)
