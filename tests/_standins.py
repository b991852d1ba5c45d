"""Strict stand-ins for the GPU kernel APIs that kernels/attention.py calls, so every CUDA branch
runs on CPU: same signatures (checked against the real aten schemas by a test), the same
requirements the real kernels have (dtype, layout, contiguity, shapes, argument values), and the
naive reference for the numbers. What each real kernel requires, and where it is enforced:

- aten._scaled_dot_product_flash_attention{,_backward} (CUDA; FlashAttention-2 inside): q/k/v
  [B, H, S, D] with unit stride in D, fp16/bf16, one dtype, head_dim % 8 == 0 and <= 256,
  Hq % Hkv == 0 (GQA native); causal with Sq != Sk is aligned to the bottom right; the backward
  reads logsumexp as a dense [B, H, Sq] fp32 array; max_q/max_k are the sequence lengths.
- aten._scaled_dot_product_efficient_attention{,_backward} (CUDA): fp16/bf16/fp32, equal head
  counts, causal from the top left; the lse is padded to a multiple of 32 rows and the backward
  takes it padded and dense.
- flash_attn.flash_attn_interface._flash_attn_forward/_backward (flash-attn >= 2.7): q/k/v
  [B, S, H, D] with unit stride in D, fp16/bf16, causal bottom-right; the backward writes into
  dense dq/dk/dv and reads softmax_lse as a dense array (defect 2 of issue 15: a strided lse gave
  wrong gradients there).

`install()` puts them in place (also inside spawned gloo workers); `Calls` counts what ran.
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import torch
from longctx.kernels import attention

HALF = (torch.float16, torch.bfloat16)
calls: Counter = Counter()


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"kernel contract: {what}")


def _check_qkv(q, k, v, heads_dim: int, dtypes, gqa: bool, name: str) -> None:
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        _require(t.dim() == 4, f"{name}: {n} must be 4-D, got {tuple(t.shape)}")
        _require(t.stride(-1) == 1, f"{name}: {n} must have unit stride in head_dim, strides {t.stride()}")
        _require(t.dtype in dtypes, f"{name}: {n} dtype {t.dtype} not in {dtypes}")
    _require(q.dtype == k.dtype == v.dtype, f"{name}: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    _require(k.shape == v.shape, f"{name}: k and v shapes differ")
    hq, hkv = q.shape[heads_dim], k.shape[heads_dim]
    _require(hq % hkv == 0 if gqa else hq == hkv, f"{name}: {hq} query heads vs {hkv} K/V heads")
    d = q.shape[-1]
    _require(d % 8 == 0 and d <= 256 if q.dtype in HALF else True, f"{name}: head_dim {d}")


def _reference(q_bshd, k_bshd, v_bshd, causal: bool, align: str):
    """(out, lse) with the kernel's causal alignment: top-left, or bottom-right (FA2) where the
    last query sees the last key."""
    Sq, Sk = q_bshd.shape[1], k_bshd.shape[1]
    if causal and align == "bottom_right" and Sq != Sk:
        return _shifted(q_bshd, k_bshd, v_bshd, Sk - Sq)
    return attention.reference_block_attn(q_bshd, k_bshd, v_bshd, causal)


def _shifted(q, k, v, shift: int):
    """Causal with query i seeing keys <= i + shift (bottom-right alignment), naive fp32."""
    groups = q.shape[2] // k.shape[2]
    kf, vf = k.float().repeat_interleave(groups, 2), v.float().repeat_interleave(groups, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * q.shape[-1] ** -0.5
    visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(shift)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype), lse


def _reference_bwd(dout, q, k, v, out, lse, causal: bool, align: str):
    """dq, dk, dv by autograd through the same masked softmax, from the given out and lse (what a
    FlashAttention-2 backward computes: P from lse, D = rowsum(dO * O))."""
    Sq, Sk = q.shape[1], k.shape[1]
    shift = Sk - Sq if (causal and align == "bottom_right") else 0
    groups = q.shape[2] // k.shape[2]
    kf, vf = k.float().repeat_interleave(groups, 2), v.float().repeat_interleave(groups, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool).tril(shift), float("-inf"))
    p = torch.exp(s - lse.float()[..., None]).nan_to_num(0.0)
    do = dout.float()
    delta = (do * out.float()).sum(-1).transpose(1, 2)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vf) - delta[..., None])
    scale = q.shape[-1] ** -0.5
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    B, _, Hkv, D = k.shape
    dk, dv = dk.view(B, Sk, Hkv, groups, D).sum(3), dv.view(B, Sk, Hkv, groups, D).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check_scale(scale, head_dim: int, name: str) -> None:
    # the kernels default to 1/sqrt(head_dim); ours always pass it, and it must be that
    _require(scale is not None and abs(scale - head_dim ** -0.5) < 1e-12, f"{name}: scale {scale}")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """What a kernel that indexes `t` as a dense array reads: the storage from t's offset with
    contiguous strides (a strided view gives other numbers, as on the GPU)."""
    return torch.as_strided(t, t.shape, torch.empty(t.shape).stride(), t.storage_offset())


def _t(x):
    return x.transpose(1, 2)


# --- aten (PyTorch's fused CUDA ops) ---------------------------------------------------------------
def sdpa_flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    calls["aten_flash.fwd"] += 1
    _check_qkv(query, key, value, 1, HALF, True, "aten flash fwd")
    _require(dropout_p == 0.0 and not return_debug_mask, "aten flash fwd: dropout 0, no debug mask")
    _check_scale(scale, query.shape[-1], "aten flash fwd")
    out, lse = _reference(_t(query), _t(key), _t(value), is_causal, "bottom_right")
    Sq, Sk = query.shape[2], key.shape[2]
    seed = torch.empty((), dtype=torch.long)
    # the real kernel returns out as a [B, H, S, D] view of a [B, S, H, D] buffer and a dense lse
    return _t(out.contiguous()), lse.contiguous(), None, None, Sq, Sk, seed, seed, torch.empty(0, dtype=query.dtype)


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):
    calls["aten_flash.bwd"] += 1
    _check_qkv(query, key, value, 1, HALF, True, "aten flash bwd")
    _check_scale(scale, query.shape[-1], "aten flash bwd")
    for t, n in ((grad_out, "grad_out"), (out, "out")):
        _require(t.shape == query.shape and t.dtype == query.dtype and t.stride(-1) == 1, f"aten flash bwd: {n}")
    B, H, Sq, _ = query.shape
    _require(logsumexp.dtype == torch.float32 and tuple(logsumexp.shape) == (B, H, Sq),
             f"aten flash bwd: logsumexp {logsumexp.dtype} {tuple(logsumexp.shape)}")
    _require(logsumexp.is_contiguous(), "aten flash bwd: logsumexp is read as a dense [B, H, Sq] array")
    _require(cum_seq_q is None and cum_seq_k is None, "aten flash bwd: dense inputs take no cumulative lengths")
    _require(max_q == Sq and max_k == key.shape[2], f"aten flash bwd: max_q/max_k {max_q}/{max_k}")
    _require(dropout_p == 0.0 and isinstance(philox_seed, torch.Tensor) and isinstance(philox_offset, torch.Tensor),
             "aten flash bwd: dropout 0 and philox tensors")
    dq, dk, dv = _reference_bwd(_t(grad_out), _t(query), _t(key), _t(value), _t(out), logsumexp, is_causal,
                                "bottom_right")
    return _t(dq), _t(dk), _t(dv)


def sdpa_efficient(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    calls["aten_efficient.fwd"] += 1
    _check_qkv(query, key, value, 1, HALF + (torch.float32,), False, "aten efficient fwd")
    _check_scale(scale, query.shape[-1], "aten efficient fwd")
    _require(attn_bias is None and compute_log_sumexp and dropout_p == 0.0, "aten efficient fwd: arguments")
    out, lse = _reference(_t(query), _t(key), _t(value), is_causal, "top_left")
    B, H, Sq, _ = query.shape
    padded = torch.full((B, H, -(-Sq // 32) * 32), float("nan"))  # padding rows are never valid
    padded[:, :, :Sq] = lse
    seed = torch.empty((), dtype=torch.long)
    return _t(out.contiguous()), padded, seed, seed


def sdpa_efficient_backward(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                            dropout_p, grad_input_mask, is_causal=False, *, scale=None):
    calls["aten_efficient.bwd"] += 1
    _check_qkv(query, key, value, 1, HALF + (torch.float32,), False, "aten efficient bwd")
    _check_scale(scale, query.shape[-1], "aten efficient bwd")
    for t, n in ((grad_out_, "grad_out_"), (out, "out")):
        _require(t.shape == query.shape and t.dtype == query.dtype and t.stride(-1) == 1, f"aten efficient bwd: {n}")
    B, H, Sq, _ = query.shape
    _require(tuple(logsumexp.shape) == (B, H, -(-Sq // 32) * 32) and logsumexp.is_contiguous()
             and logsumexp.dtype == torch.float32, f"aten efficient bwd: logsumexp {tuple(logsumexp.shape)} "
             "(padded to a multiple of 32, dense, fp32)")
    _require(attn_bias is None and dropout_p == 0.0 and list(grad_input_mask) == [True, True, True, False],
             "aten efficient bwd: arguments")
    dq, dk, dv = _reference_bwd(_t(grad_out_), _t(query), _t(key), _t(value), _t(out), logsumexp[:, :, :Sq],
                                is_causal, "top_left")
    return _t(dq), _t(dk), _t(dv), None


class StrictAten:
    """torch.ops.aten with the CUDA-only fused attention ops replaced by the stand-ins above."""

    def __init__(self) -> None:
        self._ops = {"_scaled_dot_product_flash_attention": sdpa_flash,
                     "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward,
                     "_scaled_dot_product_efficient_attention": sdpa_efficient,
                     "_scaled_dot_product_efficient_attention_backward": sdpa_efficient_backward}

    def __getattr__(self, name):
        return self._ops.get(name) or getattr(torch.ops.aten, name)


# --- flash-attn >= 2.7 ------------------------------------------------------------------------------
def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                        alibi_slopes, return_softmax):
    calls["flash_attn.fwd"] += 1
    _check_qkv(q, k, v, 2, HALF, True, "flash_attn fwd")
    _require(dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_softmax
             and (window_size_left, window_size_right) == (-1, -1), "flash_attn fwd: arguments")
    _require(abs(softmax_scale - q.shape[-1] ** -0.5) < 1e-12, f"flash_attn fwd: softmax_scale {softmax_scale}")
    out, lse = _reference(q, k, v, causal, "bottom_right")
    return out.contiguous(), lse.contiguous(), None, torch.empty(2, dtype=torch.int64)


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    calls["flash_attn.bwd"] += 1
    _check_qkv(q, k, v, 2, HALF, True, "flash_attn bwd")
    for t, like, n in ((dout, q, "dout"), (out, q, "out"), (dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
        _require(t.shape == like.shape and t.dtype == like.dtype, f"flash_attn bwd: {n} shape/dtype")
    for t, n in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        _require(t.is_contiguous(), f"flash_attn bwd: {n} is written as a dense array")
    B, Sq, H, _ = q.shape
    _require(tuple(softmax_lse.shape) == (B, H, Sq) and softmax_lse.dtype == torch.float32,
             f"flash_attn bwd: softmax_lse {tuple(softmax_lse.shape)} {softmax_lse.dtype}")
    _require(dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not deterministic
             and (window_size_left, window_size_right) == (-1, -1), "flash_attn bwd: arguments")
    _check_scale(softmax_scale, q.shape[-1], "flash_attn bwd")
    # The real kernel does not check the lse's strides: it reads it densely. Read it that way.
    grads = _reference_bwd(dout, q, k, v, out, _dense(softmax_lse), causal, "bottom_right")
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return torch.empty(B, H, Sq)


def flash_attn_module(version: str = "2.7.4") -> types.ModuleType:
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward = _flash_attn_forward
    interface._flash_attn_backward = _flash_attn_backward
    package.flash_attn_interface = interface
    return package


def install(monkeypatch=None) -> None:
    """Swap the stand-ins in (with pytest's monkeypatch when given, so they are undone)."""
    package = flash_attn_module()
    if monkeypatch is None:
        attention.aten_ops = StrictAten()
        sys.modules["flash_attn"] = package
        sys.modules["flash_attn.flash_attn_interface"] = package.flash_attn_interface
        return
    monkeypatch.setattr(attention, "aten_ops", StrictAten())
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", package.flash_attn_interface)
