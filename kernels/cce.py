"""Cut Cross-Entropy Triton kernels (Wijmans et al., arXiv 2411.09009, §4 and Algorithms 1-3).

Forward (`_cce_fwd`): one program per block of valid tokens walks the vocabulary in tiles; each
tile of logits z = h W^T is accumulated over D in on-chip blocks, optionally softcapped, folded
into an online log-sum-exp, and the target logit is picked out of the tile it falls in (the
indexed dot). Only LSE (fp32, per token) is written; when gradients are needed the same pass
adds each vocabulary column's logit sum (for vocabulary sorting).

Backward (`_cce_bwd`): one program per (token block, vocabulary block) recomputes its logit tile
and forms the unscaled logit gradient u = softmax * (1 + 2 z_loss LSE) - onehot from the saved
LSE (times the softcap derivative when capped). It skips the tile when every |u| < eps (gradient
filtering, §4.3: 2^-12 for bf16), and only then scales by the per-token upstream gradient,
dz = u * g, and adds dz W into dH and dz^T H into dW with fp32 atomics. Filtering the unscaled u,
as the paper's kernel does, matters: the trainer backpropagates sum / (valid tokens in the step),
so g is 2^-13 or smaller and a test on dz would skip every tile, the target's too. Vocabulary
blocks follow the columns sorted by average logit (§4.3), so the few non-negligible columns
cluster into few tiles.

Ignored tokens are compacted into an index list first, so they cost nothing. Offsets are int64
(N*D > 2^31 works). Both inputs reach the kernels in one dtype: the autocast dtype when autocast
is on (as Apple's ml-cross-entropy does; autograd casts the gradients back), else the promoted
one. On GPU bf16 tiles go to tl.dot directly and fp32 tiles use TF32 when PyTorch allows it for
matmuls (torch.backends.cuda.matmul.allow_tf32 / fp32_precision="tf32"), else IEEE fp32. Under
TRITON_INTERPRET=1 (CPU) bf16 arithmetic is wrong in the interpreter, so every load is cast to
fp32 before use and every dot is IEEE fp32 (DOT_FP32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .loss import resolve_filter_eps


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logit_tile(H, W, rows64, row_mask, cols64, col_mask, D, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(H + rows64[:, None] * stride_h + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + cols64[:, None] * stride_w + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(h, tl.trans(w))
    return acc


@triton.jit
def _cce_fwd(H, W, ROWS, Y, LSE, TARGET, COLSUM, N, V, D, stride_h, stride_w, softcap,
             HAS_SOFTCAP: tl.constexpr, COLLECT_COLSUM: tl.constexpr, DOT_FP32: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local < N
    rows64 = tl.load(ROWS + local, mask=row_mask, other=0).to(tl.int64)
    y = tl.load(Y + local, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(H, W, rows64, row_mask, cols.to(tl.int64), col_mask, D, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if COLLECT_COLSUM:
            tl.atomic_add(COLSUM + cols, tl.sum(tl.where(row_mask[:, None], z, 0.0), 0), mask=col_mask)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + local, m + tl.log(s), mask=row_mask)
    tl.store(TARGET + local, target, mask=row_mask)


@triton.jit
def _cce_bwd(H, W, ROWS, Y, ORDER, LSE, G, DH, DW, N, V, D, stride_h, stride_w, softcap, z_loss, eps,
             HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local < N
    rows64 = tl.load(ROWS + local, mask=row_mask, other=0).to(tl.int64)
    sorted_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = sorted_cols < V
    cols = tl.load(ORDER + sorted_cols, mask=col_mask, other=0)  # vocabulary sorted by average logit
    cols64 = cols.to(tl.int64)
    z = _logit_tile(H, W, rows64, row_mask, cols64, col_mask, D, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    lse = tl.load(LSE + local, mask=row_mask, other=0.0)
    y = tl.load(Y + local, mask=row_mask, other=-1)
    # d(LSE + z_loss LSE^2 - z_y)/dz = softmax * (1 + 2 z_loss LSE) - onehot: the unscaled gradient
    u = tl.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
    u = u - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:
        u = u * (1.0 - t * t)
    u = tl.where(row_mask[:, None] & col_mask[None, :], u, 0.0)  # padding rows and columns add nothing
    # Filter before scaling by the upstream gradient (§4.3): eps is relative to |softmax - onehot| <= 1.
    # Every |u| < eps, tested as "all below" so that a NaN tile is never skipped.
    if FILTER:
        if tl.min((tl.abs(u) < eps).to(tl.int32)) == 1:
            return
    g = tl.load(G + local, mask=row_mask, other=0.0)
    dz = u * g[:, None]
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        w = tl.load(W + cols64[:, None] * stride_w + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        h = tl.load(H + rows64[:, None] * stride_h + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            dh = tl.dot(dz, w.to(tl.float32), input_precision=DOT_PRECISION)
            dw = tl.dot(tl.trans(dz), h.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            dh = tl.dot(dz.to(w.dtype), w)
            dw = tl.dot(tl.trans(dz).to(h.dtype), h)
        # straight into the token's row of the full [N, D] gradient: no [n, D] copy to scatter later
        tl.atomic_add(DH + rows64[:, None] * D + ds[None, :], dh, mask=row_mask[:, None] & d_mask[None, :])
        tl.atomic_add(DW + cols64[:, None] * D + ds[None, :], dw, mask=col_mask[:, None] & d_mask[None, :])


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for fp32 tiles: tf32 when PyTorch allows it for matmuls, on a real GPU only."""
    if dtype != torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return "ieee"
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 keeps fp32_precision in step with allow_tf32, and reading allow_tf32 raises once
    # the new API has been used, so read the new flag where it exists.
    allowed = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    return "tf32" if allowed else "ieee"


# Tiles: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) per kernel. DEFAULT_BLOCKS is the CPU
# interpreter's, and any kernel's on CUDA unless CUDA_BLOCKS says otherwise. CUDA_BLOCKS holds what
# Triton's autotuner picked on an H200 over CANDIDATES at Llama-3's head (N=65536, V=128256,
# D=4096, bf16; bench/results/gpu-h200-cce-autotune.jsonl): the forward's bigger tiles, the
# backward's default (its larger candidates were slower). fp32 tiles take twice the shared memory,
# so fp32 keeps the defaults; fp16 takes bf16's pick unmeasured; a GPU whose shared memory per
# block cannot hold a tile's pipelined loads (sm86/89: 99 KiB) keeps the defaults too.
# `autotune=True` times CANDIDATES on the caller's own shape instead
# (once per (V, D, dtypes) and process; each candidate compiles, ~5 s apiece).
DEFAULT_BLOCKS = (64, 128, 32, 4, 3)
CUDA_BLOCKS = {torch.bfloat16: {"fwd": (128, 256, 64, 8, 3)}, torch.float16: {"fwd": (128, 256, 64, 8, 3)}}
CANDIDATES = {
    "fwd": [DEFAULT_BLOCKS, (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3)],
    "bwd": [DEFAULT_BLOCKS, (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)],
}
_TUNED: list | None = None  # [fwd, bwd] autotuners over CANDIDATES, built on first use


def _time_on_cuda(fn, quantiles=None):
    """The autotuner's timer: one warm-up run (it compiles), then the mean of two runs by CUDA
    events. Triton's default do_bench first runs 5 estimates and then ~100 ms of repeats, which
    at the head's full size (N x V x D ~ 3.4e13 MACs) is seconds per config."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 2
    return [ms, ms, ms] if quantiles else ms


def tuned(configs: dict | None = None, do_bench=_time_on_cuda) -> list:
    """[fwd, bwd] autotuned launchers over `configs` (default CANDIDATES). Between timed runs the
    autotuner zeroes what the kernels accumulate into with atomics (the forward's column sums, the
    backward's dH and dW), so the run that counts starts from zero like an untuned one."""
    configs = configs or CANDIDATES

    def make(kind):
        return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=st)
                for bn, bv, bd, w, st in configs[kind]]

    return [triton.autotune(make("fwd"), key=["V", "D"], reset_to_zero=["COLSUM"], do_bench=do_bench)(_cce_fwd),
            triton.autotune(make("bwd"), key=["V", "D"], reset_to_zero=["DH", "DW"], do_bench=do_bench)(_cce_bwd)]


def tuned_choices() -> dict:
    """What the module's autotuners picked so far: {"fwd"|"bwd": {key: "BLOCK_N: ..."}} (bench/cce.py)."""
    if _TUNED is None:
        return {}
    return {kind: {str(key): str(cfg) for key, cfg in tuner.cache.items()} for kind, tuner in zip(("fwd", "bwd"), _TUNED)}


def _launch(blocks, which: int, kernel, grid, *args, **kwargs) -> None:
    """Runs `kernel` (which: 0 forward, 1 backward) with fixed `blocks` ({"fwd"|"bwd": 5-tuple})
    or, when `blocks` is a list of autotuners, with the one at `which` and the config it picks;
    `grid` maps the block sizes to the launch grid."""
    if isinstance(blocks, list):
        blocks[which][lambda meta: grid(meta["BLOCK_N"], meta["BLOCK_V"])](*args, **kwargs)
        return
    bn, bv, bd, warps, stages = blocks[("fwd", "bwd")[which]]
    kernel[grid(bn, bv)](*args, **kwargs, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def resolve_blocks(dtype: torch.dtype, device: torch.device, block_n=None, block_v=None, block_d=None,
                   autotune: bool = False):
    """The kernels' tiles: explicit sizes (DEFAULT_BLOCKS fills the rest) for both kernels; else the
    module's autotuners when `autotune` (CUDA only); else DEFAULT_BLOCKS, with CUDA_BLOCKS[dtype]
    over it on a GPU (not under the interpreter)."""
    global _TUNED
    on_gpu = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    if any(b is not None for b in (block_n, block_v, block_d)):
        fixed = tuple(b if b is not None else d for b, d in zip((block_n, block_v, block_d), DEFAULT_BLOCKS))
        return {"fwd": fixed + DEFAULT_BLOCKS[3:], "bwd": fixed + DEFAULT_BLOCKS[3:]}
    if autotune and on_gpu:
        if _TUNED is None:
            _TUNED = tuned()
        return _TUNED
    blocks = {"fwd": DEFAULT_BLOCKS, "bwd": DEFAULT_BLOCKS}
    if on_gpu:  # the H200-tuned tiles where this GPU's shared memory holds them (not sm86/89's 99 KiB)
        room = _shared_memory_per_block(device)
        blocks.update({k: v for k, v in CUDA_BLOCKS.get(dtype, {}).items()
                       if _tile_shared_bytes(v, dtype.itemsize) <= room})
    return blocks


def _tile_shared_bytes(tiles: tuple, itemsize: int) -> int:
    """Shared memory a tile config's pipelined loads take: (BLOCK_N + BLOCK_V) x BLOCK_D x stages."""
    bn, bv, bd, _, stages = tiles
    return (bn + bv) * bd * itemsize * stages


def _shared_memory_per_block(device: torch.device) -> int:
    """The opt-in shared memory per block of this GPU (0 when torch cannot say)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 0)


class _CCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, z_loss, reduction, opts):
        filter_eps, sort_vocab, blocks = opts
        N, D = hidden.shape
        V = weight.shape[0]
        hidden, weight = hidden.contiguous(), weight.contiguous()
        rows = (labels != ignore_index).nonzero().squeeze(1)
        y = labels[rows].contiguous()
        n = rows.numel()
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty_like(lse)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        colsum = torch.zeros(V, dtype=torch.float32, device=hidden.device) if needs_grad and sort_vocab else lse
        if n:
            _launch(blocks, 0, _cce_fwd, lambda bn, bv: (triton.cdiv(n, bn),),
                    hidden, weight, rows, y, lse, target, colsum, n, V, D, hidden.stride(0), weight.stride(0),
                    float(softcap or 1.0), HAS_SOFTCAP=softcap is not None,
                    COLLECT_COLSUM=needs_grad and sort_vocab, DOT_FP32=_dot_fp32(hidden.dtype),
                    DOT_PRECISION=_dot_precision(hidden.dtype))
        nll = lse - target
        per_token = nll + z_loss * lse * lse if z_loss else nll
        if needs_grad:
            order = torch.argsort(colsum, descending=True) if sort_vocab else torch.arange(V, device=hidden.device)
            ctx.save_for_backward(hidden, weight, rows, y, lse, order.to(torch.int32))
        ctx.meta = (N, V, D, n, softcap, z_loss, reduction, filter_eps, blocks)
        if reduction == "none":
            out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
            return out.index_copy_(0, rows, per_token)
        total = per_token.sum()
        return total / max(n, 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, y, lse, order = ctx.saved_tensors
        N, V, D, n, softcap, z_loss, reduction, eps, blocks = ctx.meta
        if reduction == "none":
            g = grad_out[rows].float().contiguous()
        else:
            scale = grad_out.float() / max(n, 1) if reduction == "mean" else grad_out.float()
            g = scale.expand(n).contiguous()
        dh = torch.zeros((N, D), dtype=torch.float32, device=hidden.device)  # ignored rows stay 0
        dw = torch.zeros((V, D), dtype=torch.float32, device=hidden.device)
        if n:
            _launch(blocks, 1, _cce_bwd, lambda bn, bv: (triton.cdiv(n, bn), triton.cdiv(V, bv)),
                    hidden, weight, rows, y, order, lse, g, dh, dw, n, V, D,
                    hidden.stride(0), weight.stride(0), float(softcap or 1.0), float(z_loss), float(eps or 0.0),
                    HAS_SOFTCAP=softcap is not None, FILTER=eps is not None, DOT_FP32=_dot_fp32(hidden.dtype),
                    DOT_PRECISION=_dot_precision(hidden.dtype))
        return dh.to(hidden.dtype), dw.to(weight.dtype), None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
    filter_eps: float | str | None = "auto",
    sort_vocab: bool = True,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    autotune: bool = False,
    blocks: dict | list | None = None,
) -> torch.Tensor:
    """Cut Cross-Entropy with Triton kernels; same contract as kernels.cce_torch.linear_cross_entropy.

    filter_eps: skip a backward tile when every |softmax - onehot| in it is below this (before the
    upstream gradient scales it): "auto" (finfo(dtype).eps / 32: 2^-12 for bf16, 2^-28 for fp32),
    a number >= 0, or "off" / None to compute every tile (exact).
    Under autocast both inputs are cast to the autocast dtype; otherwise mixed dtypes are promoted.
    Gradients accumulate in fp32 buffers (atomics) and are cast to the input dtypes at the end.
    block_n/block_v/block_d: fixed tiles for both kernels (any left None takes DEFAULT_BLOCKS');
    none given: `resolve_blocks` (CUDA_BLOCKS on a GPU), or with `autotune` the fastest of CANDIDATES
    on this shape (`tuned_choices()` says which). blocks: what `resolve_blocks` or `tuned()` returns,
    to use as it is.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected mean, sum or none")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # no-op when already there; autograd casts grads back
    chosen = blocks if blocks is not None else resolve_blocks(dtype, hidden.device, block_n, block_v, block_d, autotune)
    opts = (resolve_filter_eps(filter_eps, dtype), sort_vocab, chosen)
    return _CCE.apply(hidden, weight, labels, ignore_index, softcap, z_loss, reduction, opts)


# --- one vocabulary shard (parallel/vocab.py): the same kernels, statistics merged by the caller ------
def _kernel_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _inside(labels: torch.Tensor, V: int) -> torch.Tensor:
    """Labels of other shards -> -1: the kernels' padding columns (>= V) would match a label past
    the shard and pick their -inf."""
    return torch.where((labels >= 0) & (labels < V), labels, -1).contiguous()


def shard_lse_target(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None):
    """(log-sum-exp over weight's rows, target logit) per row of hidden, fp32 [N] each: the forward
    kernel over a vocabulary shard; a label outside [0, rows) picks nothing (target 0), an empty
    shard gives -inf. Cast as `linear_cross_entropy` casts."""
    N, D = hidden.shape
    V = weight.shape[0]
    lse = torch.full((N,), float("-inf"), dtype=torch.float32, device=hidden.device)
    target = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if N == 0 or V == 0:
        return lse, target
    dtype = _kernel_dtype(hidden, weight)
    hidden, weight = hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()
    rows = torch.arange(N, device=hidden.device)
    _launch(resolve_blocks(dtype, hidden.device), 0, _cce_fwd, lambda bn, bv: (triton.cdiv(N, bn),),
            hidden, weight, rows, _inside(labels, V), lse, target, lse, N, V, D, hidden.stride(0), weight.stride(0),
            float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, COLLECT_COLSUM=False,
            DOT_FP32=_dot_fp32(dtype), DOT_PRECISION=_dot_precision(dtype))
    return lse, target


def shard_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                z_loss: float, softcap: float | None, dw: torch.Tensor, filter_eps: float | str | None = "auto"):
    """dHidden [N, D] fp32 of a vocabulary shard given the *global* LSE (so the softmax is the whole
    vocabulary's), the per-token upstream gradient g; dWeight added into dw (fp32, contiguous
    [rows, D]) by the kernel's atomics. Filtering is valid: |u| uses the global softmax."""
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros((N, D), dtype=torch.float32, device=hidden.device)
    if N == 0 or V == 0:
        return dh
    dtype = _kernel_dtype(hidden, weight)
    hidden, weight = hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()
    if dw.dtype != torch.float32 or not dw.is_contiguous():
        raise ValueError("dw: expected a contiguous fp32 buffer (the kernel adds into it atomically)")
    eps = resolve_filter_eps(filter_eps, dtype)
    order = torch.arange(V, device=hidden.device, dtype=torch.int32)
    rows = torch.arange(N, device=hidden.device)
    _launch(resolve_blocks(dtype, hidden.device), 1, _cce_bwd, lambda bn, bv: (triton.cdiv(N, bn), triton.cdiv(V, bv)),
            hidden, weight, rows, _inside(labels, V), order, lse.contiguous(), g.float().contiguous(), dh, dw, N, V, D,
            hidden.stride(0), weight.stride(0), float(softcap or 1.0), float(z_loss), float(eps or 0.0),
            HAS_SOFTCAP=softcap is not None, FILTER=eps is not None, DOT_FP32=_dot_fp32(dtype),
            DOT_PRECISION=_dot_precision(dtype))
    return dh
