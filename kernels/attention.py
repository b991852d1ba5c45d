"""Single-device attention, q/k/v as [B, S, H, D], GQA when Hq % Hkv == 0 (K/V never repeated).

- `local_attention(q, k, v)`: causal attention for an unsharded sequence (sp = 1), PyTorch SDPA.
- `block_attn(q, k, v, causal) -> (out, lse)` and `block_attn_bwd(dout, q, k, v, out, lse, causal)`:
  one block of a sequence-parallel schedule. `lse` [B, H, S] is fp32 natural-log log-sum-exp of
  the scaled scores. Causal masking with Sq != Sk is top-left aligned (query i sees keys <= i).
  Backends: flash-attn on CUDA when installed, aten's CPU flash op, and `reference` (naive fp32).
- `merge(out, lse, out_i, lse_i)`: combine two partial results over disjoint key sets in fp32:
  lse = logaddexp(lse, lse_i), out = out*exp(lse_old - lse) + out_i*exp(lse_i - lse). A row that
  saw no key has lse = -inf (or +inf from some kernels): it contributes nothing.

The backward of a block given the *global* out and lse is that block's exact share of dq, dk, dv
(the FlashAttention-2 backward only needs P = exp(s - lse) and D = rowsum(dO * O)), so blocks can
be computed anywhere and summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capability import has_flash_attn


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast, q/k/v in the autocast dtype (what SDPA's autocast rule does): RoPE leaves q
    and k in fp32 while v comes out of a bf16 matmul, and the block kernels need one dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def local_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """`local_attention` that also returns the lse, with no autograd graph: for callers that keep
    (out, lse) and run the backward themselves (memory/offload.py)."""
    return block_attn(*autocast_inputs(q, k, v), causal=True)


def local_attention_bwd(dout, q, k, v, out, lse):
    q2, k2, v2 = autocast_inputs(q, k, v)
    dq, dk, dv = block_attn_bwd(dout.to(out.dtype), q2, k2, v2, out, lse, causal=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return reference_block_attn(q, k, v, causal=True)[0]


# --- blocks ------------------------------------------------------------------------------------
def _backend(q: torch.Tensor, impl: str) -> str:
    if impl != "auto":
        return impl
    if q.is_cuda:
        return "flash_attn" if has_flash_attn() else "reference"
    return "aten_cpu"


def reference_block_attn(q, k, v, causal: bool):
    """Naive fp32 attention returning (out in q's dtype, lse fp32 [B, H, Sq])."""
    groups = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(groups, dim=2)
    vf = v.float().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * q.shape[-1] ** -0.5
    if causal:
        Sq, Sk = q.shape[1], k.shape[1]
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.to(q.dtype), lse


def block_attn(q, k, v, causal: bool, impl: str = "auto"):
    backend = _backend(q, impl)
    if backend == "aten_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal
        )
        return out.transpose(1, 2), lse
    if backend == "flash_attn":
        from flash_attn.flash_attn_interface import (
            _flash_attn_forward,  # CUDA only; not exercised on CPU CI
        )

        out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, None, False)
        return out, lse
    return reference_block_attn(q, k, v, causal)


def block_attn_bwd(dout, q, k, v, out, lse, causal: bool, impl: str = "auto"):
    """(dq, dk, dv) of one block given the global out and lse of these query rows."""
    backend = _backend(q, impl)
    if backend == "aten_cpu":
        def t(x):
            return x.transpose(1, 2)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), 0.0, causal
        )
        return t(dq), t(dk), t(dv)
    if backend == "flash_attn":
        from flash_attn.flash_attn_interface import (
            _flash_attn_backward,  # CUDA only; not exercised on CPU CI
        )

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, q.shape[-1] ** -0.5, causal, -1, -1, 0.0,
                             None, False)
        return dq, dk, dv
    return reference_block_attn_bwd(dout, q, k, v, out, lse, causal)


def reference_block_attn_bwd(dout, q, k, v, out, lse, causal: bool):
    """FlashAttention-2 backward in fp32: P = exp(s - lse), D = rowsum(dO*O), dS = P*(dO V^T - D)."""
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5
    kf = k.float().repeat_interleave(groups, dim=2)
    vf = v.float().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if causal:
        visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.exp(scores - lse.float()[..., None]).nan_to_num(0.0)
    do = dout.float()
    delta = (do * out.float()).sum(-1).transpose(1, 2)  # [B, H, Sq]
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vf)
    ds = probs * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    B, Sk, Hkv, D = k.shape
    dk = dk.view(B, Sk, Hkv, groups, D).sum(3)
    dv = dv.view(B, Sk, Hkv, groups, D).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor):
    """Merges a partial (out_i [B,S,H,D], lse_i [B,H,S]) into the running fp32 (out, lse)."""
    lse_i = torch.where(torch.isposinf(lse_i), torch.full_like(lse_i, float("-inf")), lse_i.float())
    if out is None:
        return out_i.float(), lse_i
    new = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # rows with no key yet
    w_old = torch.exp(lse - safe).transpose(1, 2)[..., None]
    w_new = torch.exp(lse_i - safe).transpose(1, 2)[..., None]
    return out * w_old + out_i.float() * w_new, new
