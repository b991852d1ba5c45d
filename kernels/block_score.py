"""LeMo's exact block score as one Triton kernel (memory/elimination.py has the definition, the
dense reference and the tiled torch path this must equal).

One program per (key block n, row b) walks every query block m in order: for each query head h
it forms the block_tokens x block_tokens tile q_h k_{h // G}^T in fp32 (tl.dot), adds its ReLU into
an fp32 accumulator, takes the tile's maximum and adds it to the key block's running sum; the
sum over heads is divided by Hq at the end. Nothing of size S x S is ever written: the output is
[B, key blocks]. The walk over query blocks is sequential inside the program, so the sum is
deterministic: a recomputed forward (offload.segment) selects the same blocks, which a kernel
with atomic adds would not guarantee.

bf16/fp16 tiles go to tl.dot directly (products exact in the fp32 accumulator); fp32 tiles use
IEEE fp32 dots (not TF32), like the reference. Under TRITON_INTERPRET=1 (CPU) the interpreter's bf16
arithmetic is wrong, so every load is cast to fp32 first.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _block_score(Q, K, OUT, SQ, SK, NQ, NK, HQ, G, inv_heads,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr):
    n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    krows = (n * BLOCK + rows).to(tl.int64)
    kmask = (krows < SK)[:, None] & dmask[None, :]
    total = tl.zeros((), dtype=tl.float32)
    for m in range(0, NQ):
        qrows = (m * BLOCK + rows).to(tl.int64)
        qmask = (qrows < SQ)[:, None] & dmask[None, :]
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for h in range(0, HQ):
            q = tl.load(Q + b * stride_qb + qrows[:, None] * stride_qs + h * stride_qh + dims[None, :], mask=qmask,
                        other=0.0)
            k = tl.load(K + b * stride_kb + krows[:, None] * stride_ks + (h // G) * stride_kh + dims[None, :],
                        mask=kmask, other=0.0)
            if FP32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            acc += tl.maximum(s, 0.0)
        total += tl.max(tl.max(acc, axis=1), axis=0)
    tl.store(OUT + b * NK + n, total * inv_heads)


def block_scores_triton(q: torch.Tensor, k: torch.Tensor, block_tokens: int = 64) -> torch.Tensor:
    """q [B, Sq, Hq, D], k [B, Sk, Hkv, D] -> [B, ceil(Sk / block_tokens)] fp32 scores of the key
    blocks (elimination.block_scores_reference's definition). block_tokens: a power of two >= 16."""
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens={block_tokens}: the Triton score needs a power of two >= 16")
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k = q.contiguous(), k.contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a unit stride on head_dim")
    nq, nk = math.ceil(Sq / block_tokens), math.ceil(k.shape[1] / block_tokens)
    out = torch.empty(B, nk, dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32 or k.dtype != q.dtype or os.environ.get("TRITON_INTERPRET") == "1"
    _block_score[(nk, B)](
        q, k, out, Sq, k.shape[1], nq, nk, Hq, Hq // Hkv, 1.0 / Hq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        BLOCK=block_tokens, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), FP32=fp32,
    )
    return out
