"""Single-device attention, q/k/v as [B, S, H, D], GQA when Hq % Hkv == 0.

- `local_attention(q, k, v)`: causal attention for an unsharded sequence (sp = 1), PyTorch SDPA
  (on CUDA restricted to the one fused kernel `auto` picks: the O(S^2) math fallback never runs).
- `block_attn(q, k, v, causal, impl) -> (out, lse)` and `block_attn_bwd(dout, q, k, v, out, lse,
  causal, impl)`: one block of a sequence-parallel schedule or of MEMO's kept-(out, lse) path.
  `lse` [B, H, S] is fp32 natural-log log-sum-exp of the scaled scores. Causal masking with
  Sq != Sk is top-left aligned (query i sees keys <= i).
- Packed documents (issue 18): `block_attn(..., q_docs=, k_docs=)` and `block_attn_bwd(...)` mask
  every pair of different documents. q_docs [B, Sq] / k_docs [B, Sk] are integer document ids
  (host tensors: they only plan which tiles run), constant over each document's contiguous
  run; or (ids, positions within the documents) when the rows are not in sequence order (a
  balanced sequence-parallel layout), and then a query sees a key of its document at a position
  <= its own. `document_tiles` turns them into (query slice, key slice, causal) tiles, one per
  run pair of the same document, and the block's kernel runs per tile (the fused kernels on
  CUDA, aten's flash op on CPU): no Sq x Sk mask exists, a block with no visible pair runs
  nothing and returns out 0, lse -inf. The tiles' partials merge by LSE; their backward against
  the block's (out, lse) sums to the block's. Reference: `reference_block_attn` with the same
  ids (a dense mask). Many short documents mean many small kernel calls (flash-attn's varlen
  entry point would take them in one; not used yet).
- `merge(out, lse, out_i, lse_i)` (and `merge_into`, in place): combine two partial results over disjoint key sets in fp32:
  lse = logaddexp(lse, lse_i), out = out*exp(lse_old - lse) + out_i*exp(lse_i - lse). A row that
  saw no key has lse = -inf (or +inf from some kernels): it contributes nothing.

Block kernels (`KERNELS`; `auto` picks per device and dtype, `resolve_kernel` names the pick):
  aten_flash      CUDA: PyTorch's own flash kernel, `aten._scaled_dot_product_flash_attention`
                  and its backward (fp16/bf16, sm80+); GQA natively. The default on CUDA.
  aten_efficient  CUDA: `aten._scaled_dot_product_efficient_attention` and its backward (fp32 too);
                  K/V heads expanded for GQA, their gradients summed back.
  flash_attn      CUDA, optional: flash-attn >= 2.7's forward/backward, preferred when installed
                  and its signature checks out (kernels.capability.flash_attn_status).
  aten_cpu        CPU: aten's flash op for CPU, which returns the lse and has a backward.
  reference       naive fp32 (O(Sq*Sk) memory): tests, and only when a recipe asks for it.
Every external call goes through `aten_ops` (torch.ops.aten) or `flash_attn_api()`, so tests swap
in strict stand-ins that check what the real APIs require (tests/_standins.py). Calls pass
contiguous tensors: flash-attn's backward reads the lse as a dense [B, H, Sq] array, and a
schedule's row slice of it is strided.

The backward of a block given the *global* out and lse is that block's exact share of dq, dk, dv
(the FlashAttention-2 backward only needs P = exp(s - lse) and D = rowsum(dO * O)), so blocks can
be computed anywhere and summed.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from . import capability
from .documents import document_tiles, documents_backward, documents_forward
from .merge import merge, merge_into

KERNELS = ("auto", "aten_flash", "aten_efficient", "flash_attn", "aten_cpu", "reference")
CUDA_KERNELS = ("aten_flash", "aten_efficient", "flash_attn")
_EFFICIENT_LSE_ALIGN = 32  # the memory-efficient kernel pads its lse rows to a multiple of 32

aten_ops = torch.ops.aten  # the seam for PyTorch's fused attention ops (tests swap in stand-ins)


def flash_attn_api():
    """flash-attn's private interface module (the seam; tests put a stand-in in sys.modules)."""
    return importlib.import_module("flash_attn.flash_attn_interface")


def resolve_kernel(kernel: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """The block kernel `kernel` means on this device for this dtype; `auto` never picks reference."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    device_type = torch.device(device).type
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and capability.has_flash_attn():
            return "flash_attn"
        return "aten_flash" if capability.aten_flash_supports(dtype, head_dim) else "aten_efficient"
    if device_type == "cpu":
        return "aten_cpu"
    raise ValueError(f"no fused attention kernel for device {device_type!r}; set the kernel to reference explicitly")


def check_kernel_available(kernel: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `kernel` cannot run here (None when it can): for the recipe's validation."""
    device_type = torch.device(device).type
    if kernel in CUDA_KERNELS and device_type != "cuda":
        return f"{kernel} runs on CUDA only (this run is on {device_type})"
    if kernel == "aten_cpu" and device_type != "cpu":
        return "aten_cpu runs on CPU only"
    if kernel == "flash_attn":
        ok, why = capability.flash_attn_status()
        if not ok:
            return why
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn needs fp16/bf16 (this run computes attention in {dtype})"
    if kernel == "aten_flash" and not capability.aten_flash_supports(dtype, head_dim):
        return f"aten_flash needs fp16/bf16, head_dim <= 256 (multiple of 8) and an sm80+ GPU (dtype {dtype}, head_dim {head_dim})"
    return None


# --- sp = 1 ------------------------------------------------------------------------------------
def expand_kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """GQA by expansion: each K/V head repeated for the query heads of its group ([B, S, H, D])."""
    return x if x.shape[2] == heads_q else x.repeat_interleave(heads_q // x.shape[2], dim=2)


def sum_kv_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """The gradient of expand_kv_heads: each group's query-head gradients summed onto its K/V head."""
    B, S, Hq, D = grad.shape
    return grad if Hq == heads_kv else grad.reshape(B, S, heads_kv, Hq // heads_kv, D).sum(3)


# On CUDA, SDPA runs exactly the kernel `auto` resolves to (so the run log can name it); the
# flash-attn package has no SDPA backend and runs through BlockAttention instead.
_SDPA_BACKENDS = {"aten_flash": "FLASH_ATTENTION", "aten_efficient": "EFFICIENT_ATTENTION"}


def sdpa_plan(dtype: torch.dtype, head_dim: int, gqa: bool) -> tuple[str, str | None, bool]:
    """On CUDA: (block kernel, SDPA backend name or None for BlockAttention, expand K/V heads)."""
    kernel = resolve_kernel("auto", "cuda", dtype, head_dim)
    backend = _SDPA_BACKENDS.get(kernel)
    return kernel, backend, gqa and kernel == "aten_efficient"  # the efficient kernel takes no GQA


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA with autograd. On CUDA only the one fused kernel `auto` picks may run: a shape
    it does not take fails loudly instead of falling back to the math kernel's S x S scores."""
    gqa = q.shape[2] != k.shape[2]
    if not q.is_cuda:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    kernel, backend, expand = sdpa_plan(dtype, q.shape[-1], gqa)
    if backend is None:
        return BlockAttention.apply(*autocast_inputs(q, k, v), True, kernel)
    if expand:
        k, v, gqa = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2]), False
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast, q/k/v in the autocast dtype (what SDPA's autocast rule does): RoPE leaves q
    and k in fp32 while v comes out of a bf16 matmul, and the block kernels need one dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """t in the autocast dtype under autocast (as autocast_inputs casts q, k, v), else as is."""
    device = t.device.type
    return t.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else t


class BlockAttention(torch.autograd.Function):
    """block_attn / block_attn_bwd of one kernel as an autograd Function (causal or not; with
    document ids, documents masked)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, kernel: str, q_docs=None, k_docs=None):
        out, lse = block_attn(q, k, v, causal, kernel, q_docs, k_docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.kernel, ctx.docs = causal, kernel, (q_docs, k_docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        grads = block_attn_bwd(dout.to(out.dtype), q, k, v, out, lse, ctx.causal, ctx.kernel, *ctx.docs)
        return (*grads, None, None, None, None)


class LocalAttention:
    """The model's attention callable at sp = 1. `auto` runs SDPA (fused kernels only on CUDA);
    any other kernel runs that block kernel through `BlockAttention`. `forward_lse`/`backward_lse`
    are what memory/offload.py calls when it keeps (out, lse) and runs attention's backward itself.

    `documents`: None, or the document id of every position of the rows [B, S] (packed
    documents, data.batching packed_docs): set by the trainer for the micro-batch; attention
    then masks pairs of different documents (block_attn's tiles; SDPA is not used)."""

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.documents: torch.Tensor | None = None

    def _check(self, q) -> None:
        """The documents must cover the rows attention sees: a stale or foreign set is refused."""
        d = self.documents
        ids = d[0] if isinstance(d, (tuple, list)) else d
        if ids is not None and tuple(ids.shape[:2]) != tuple(q.shape[:2]):
            raise ValueError(f"document ids {tuple(ids.shape)} do not cover the rows {tuple(q.shape[:2])}: set "
                             "attention.documents for this batch (or None)")

    def _docs(self, rows: slice | None = None, keys: slice | None = None):
        d = self.documents
        if d is None:
            return None, None
        rows, keys = rows or slice(None), keys or slice(None)
        if isinstance(d, (tuple, list)):  # (ids, positions within the documents)
            return (d[0][:, rows], d[1][:, rows]), (d[0][:, keys], d[1][:, keys])
        return d[:, rows], d[:, keys]

    def __call__(self, q, k, v):
        if self.documents is not None:
            self._check(q)
            return BlockAttention.apply(*autocast_inputs(q, k, v), True, self.kernel, *self._docs())
        if self.kernel == "auto":
            return sdpa_causal(q, k, v)
        return BlockAttention.apply(*autocast_inputs(q, k, v), True, self.kernel)

    def forward_lse(self, q, k, v):
        self._check(q)
        return block_attn(*autocast_inputs(q, k, v), True, self.kernel, *self._docs())

    def backward_lse(self, dout, q, k, v, out, lse):
        q2, k2, v2 = autocast_inputs(q, k, v)
        dq, dk, dv = block_attn_bwd(dout.to(out.dtype), q2, k2, v2, out, lse, True, self.kernel, *self._docs())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def by_rows(self) -> LocalAttention:
        """The callable whose rows methods MEMO's backward may use (sequence parallelism returns
        None while it shards the sequence)."""
        return self

    def forward_rows(self, q, k, v, start: int):
        """(out, lse) of the queries at positions [start, start + Sq) of one sequence, causal:
        the keys before `start` unmasked, the diagonal block [start, start + Sq) causal. `k`, `v`
        hold at least the keys [0, start + Sq), in the kernels' dtype; `out` comes in q's
        kernel dtype, as forward_lse returns it."""
        q2 = compute_dtype(q)
        end = start + q.shape[1]
        rows, prefix = slice(start, end), slice(0, start)
        out, lse = block_attn(q2, k[:, rows], v[:, rows], True, self.kernel, *self._docs(rows, rows))
        if start:
            acc, acc_lse = merge(None, None, out, lse)
            merge_into(acc, acc_lse, *block_attn(q2, k[:, prefix], v[:, prefix], False, self.kernel,
                                                 *self._docs(rows, prefix)))
            out, lse = acc.to(out.dtype), acc_lse
        return out, lse

    def backward_rows(self, dout, q, k, v, out, lse, start: int, dk, dv, key_block: int):
        """dq of the queries at [start, start + Sq) given their (out, lse) over all their keys;
        their share of dK and dV is added to the fp32 accumulators dk, dv [B, S, Hkv, D] (whole
        sequence). The keys before `start` go in blocks of `key_block` positions, so no kernel
        output larger than that exists; the backward of a block against the rows' global
        (out, lse) is that block's exact share (module docstring)."""
        q2 = compute_dtype(q)
        dout = dout.to(out.dtype)
        end = start + q.shape[1]
        rows = slice(start, end)
        dq, dk_i, dv_i = block_attn_bwd(dout, q2, k[:, rows], v[:, rows], out, lse, True, self.kernel,
                                        *self._docs(rows, rows))
        dq = dq.float()
        dk[:, start:end] += dk_i
        dv[:, start:end] += dv_i
        for j in range(0, start, key_block):
            keys = slice(j, min(j + key_block, start))
            dq_j, dk_i, dv_i = block_attn_bwd(dout, q2, k[:, keys], v[:, keys], out, lse, False, self.kernel,
                                              *self._docs(rows, keys))
            dq += dq_j
            dk[:, keys] += dk_i
            dv[:, keys] += dv_i
        return dq.to(q.dtype)

    def describe(self, device, dtype: torch.dtype, head_dim: int) -> str:
        """What runs, for the run log: the block kernel, `sdpa:<kernel>` for SDPA restricted to
        that kernel on CUDA, or `sdpa` on CPU (PyTorch's CPU flash kernel)."""
        block = resolve_kernel(self.kernel, device, dtype, head_dim)
        if self.kernel != "auto":
            return block
        if torch.device(device).type != "cuda":
            return "sdpa"
        return f"sdpa:{block}" if block in _SDPA_BACKENDS else block


local_attention = LocalAttention("auto")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return reference_block_attn(q, k, v, causal=True)[0]


# --- blocks ------------------------------------------------------------------------------------
def _reference_mask(scores, causal: bool, q_docs=None, k_docs=None):
    """scores [B, H, Sq, Sk] with the causal (top-left) and document masks applied (-inf)."""
    Sq, Sk = scores.shape[-2:]
    if causal:
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if isinstance(q_docs, (tuple, list)):  # (ids, positions): same document, key position <= query position
        (qi, qp), (ki, kp) = ((t.to(scores.device) for t in d) for d in (q_docs, k_docs))
        same = (qi[:, :, None] == ki[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])
        return scores.masked_fill(~same[:, None], float("-inf"))
    if q_docs is not None:
        same = q_docs.to(scores.device)[:, :, None] == k_docs.to(scores.device)[:, None, :]  # [B, Sq, Sk]
        scores = scores.masked_fill(~same[:, None], float("-inf"))
    return scores


def reference_block_attn(q, k, v, causal: bool, q_docs=None, k_docs=None):
    """Naive fp32 attention returning (out in q's dtype, lse fp32 [B, H, Sq]); with document ids,
    pairs of different documents masked (a row that sees no key: out 0, lse -inf)."""
    groups = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(groups, dim=2)
    vf = v.float().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * q.shape[-1] ** -0.5
    scores = _reference_mask(scores, causal, q_docs, k_docs)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.to(q.dtype), lse


def reference_block_attn_bwd(dout, q, k, v, out, lse, causal: bool, q_docs=None, k_docs=None):
    """FlashAttention-2 backward in fp32: P = exp(s - lse), D = rowsum(dO*O), dS = P*(dO V^T - D)."""
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5
    kf = k.float().repeat_interleave(groups, dim=2)
    vf = v.float().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    scores = _reference_mask(scores, causal, q_docs, k_docs)
    probs = torch.exp(scores - lse.float()[..., None]).nan_to_num(0.0)
    do = dout.float()
    delta = (do * out.float()).sum(-1).transpose(1, 2)  # [B, H, Sq]
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vf)
    ds = probs * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    dk, dv = sum_kv_heads(dk, k.shape[2]), sum_kv_heads(dv, k.shape[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> the [B, H, S, D] view PyTorch's fused ops take, over contiguous memory."""
    return x.contiguous().transpose(1, 2)


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _visible_keys(q, k, v, causal: bool, kernel: str):
    """FA2-style kernels align a causal mask to the bottom right when Sq != Sk; ours is top-left
    (query i sees keys <= i), so keys at or past Sq are never seen: drop them."""
    Sq, Sk = q.shape[1], k.shape[1]
    if not causal or Sq == Sk:
        return k, v
    if Sq < Sk:
        return k[:, :Sq], v[:, :Sq]
    raise ValueError(f"{kernel}: causal block with more queries ({Sq}) than keys ({Sk}) is not supported")


def _pad_keys(grad: torch.Tensor, Sk: int) -> torch.Tensor:
    if grad.shape[1] == Sk:
        return grad
    return torch.cat([grad, grad.new_zeros(grad.shape[0], Sk - grad.shape[1], *grad.shape[2:])], 1)


def _no_philox() -> torch.Tensor:
    # dropout is 0, so the kernels never read their RNG state; this is what they return for it then
    return torch.empty((), dtype=torch.long)


def _fwd_aten_cpu(q, k, v, causal):
    out, lse = aten_ops._scaled_dot_product_flash_attention_for_cpu(_bshd(q), _bshd(k), _bshd(v), 0.0, causal)
    return _bshd(out), lse


def _bwd_aten_cpu(dout, q, k, v, out, lse, causal):
    dq, dk, dv = aten_ops._scaled_dot_product_flash_attention_for_cpu_backward(
        _bshd(dout), _bshd(q), _bshd(k), _bshd(v), _bshd(out), lse.contiguous(), 0.0, causal)
    return _bshd(dq), _bshd(dk), _bshd(dv)


def _fwd_aten_flash(q, k, v, causal):
    k, v = _visible_keys(q, k, v, causal, "aten_flash")
    out, lse, *_ = aten_ops._scaled_dot_product_flash_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=q.shape[-1] ** -0.5)
    return _bshd(out), lse


def _bwd_aten_flash(dout, q, k, v, out, lse, causal):
    Sk = k.shape[1]
    k, v = _visible_keys(q, k, v, causal, "aten_flash")
    dq, dk, dv = aten_ops._scaled_dot_product_flash_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(), None, None, q.shape[1], k.shape[1],
        0.0, causal, _no_philox(), _no_philox(), scale=q.shape[-1] ** -0.5)
    return _bshd(dq), _pad_keys(_bshd(dk), Sk), _pad_keys(_bshd(dv), Sk)


def _fwd_aten_efficient(q, k, v, causal):
    Hq, Sq = q.shape[2], q.shape[1]
    out, lse, _, _ = aten_ops._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(expand_kv_heads(k, Hq)), _bhsd(expand_kv_heads(v, Hq)), None, True, 0.0, causal,
        scale=q.shape[-1] ** -0.5)
    return _bshd(out), lse[:, :, :Sq]


def _bwd_aten_efficient(dout, q, k, v, out, lse, causal):
    B, Sq, Hq, _ = q.shape
    padded = -(-Sq // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    lse_padded = torch.zeros(B, Hq, padded, dtype=torch.float32, device=q.device)
    lse_padded[:, :, :Sq] = lse
    dq, dk, dv, _ = aten_ops._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(expand_kv_heads(k, Hq)), _bhsd(expand_kv_heads(v, Hq)), None, _bhsd(out), lse_padded,
        _no_philox(), _no_philox(), 0.0, [True, True, True, False], causal, scale=q.shape[-1] ** -0.5)
    return _bshd(dq), sum_kv_heads(_bshd(dk), k.shape[2]), sum_kv_heads(_bshd(dv), v.shape[2])


def _fwd_flash_attn(q, k, v, causal):
    k, v = _visible_keys(q, k, v, causal, "flash_attn")
    out, lse, _, _ = flash_attn_api()._flash_attn_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.0, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, None, False)
    return out, lse


def _bwd_flash_attn(dout, q, k, v, out, lse, causal):
    Sk = k.shape[1]
    k, v = _visible_keys(q, k, v, causal, "flash_attn")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flash_attn_api()._flash_attn_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv, 0.0, q.shape[-1] ** -0.5, causal,
        -1, -1, 0.0, None, False, None)
    return dq, _pad_keys(dk, Sk), _pad_keys(dv, Sk)


_FORWARD = {"aten_cpu": _fwd_aten_cpu, "aten_flash": _fwd_aten_flash, "aten_efficient": _fwd_aten_efficient,
            "flash_attn": _fwd_flash_attn, "reference": reference_block_attn}
_BACKWARD = {"aten_cpu": _bwd_aten_cpu, "aten_flash": _bwd_aten_flash, "aten_efficient": _bwd_aten_efficient,
             "flash_attn": _bwd_flash_attn, "reference": reference_block_attn_bwd}


def block_attn(q, k, v, causal: bool, impl: str = "auto", q_docs=None, k_docs=None):
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] fp32) of q against k/v. Autocast is off
    inside: the inputs carry the dtype (autocast_inputs), and the lse stays fp32 on every kernel.
    With q_docs/k_docs, pairs of different documents are masked (module docstring)."""
    with torch.autocast(q.device.type, enabled=False):
        forward = _FORWARD[resolve_kernel(impl, q.device, q.dtype, q.shape[-1])]
        if q_docs is None:
            return forward(q, k, v, causal)
        return documents_forward(forward, q, k, v, causal, document_tiles(q_docs, k_docs, causal))


def block_attn_bwd(dout, q, k, v, out, lse, causal: bool, impl: str = "auto", q_docs=None, k_docs=None):
    """(dq, dk, dv) of one block given the global out and lse of these query rows."""
    with torch.autocast(q.device.type, enabled=False):
        backward = _BACKWARD[resolve_kernel(impl, q.device, q.dtype, q.shape[-1])]
        if q_docs is None:
            return backward(dout, q, k, v, out, lse, causal)
        return documents_backward(backward, dout, q, k, v, out, lse, causal,
                                   document_tiles(q_docs, k_docs, causal))
