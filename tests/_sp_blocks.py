"""The kernels' part of the sequence-parallel schedules, in one process: every rank's blocks of a
zigzag-sharded causal sequence computed with a block kernel and merged exactly as the schedules
do (parallel/blocks.py for ring, bidir_kv and token_ring, with TokenRing's rebuilt O' in the
backward; allgather_kv's causal-square + unmasked-prefix blocks), without process groups. The
transfers are what the gloo tests check; this is what a GPU checks: the CUDA kernels fed the
block shapes, strided LSE slices and stand-in outputs the schedules feed them.

Used by tests/test_sp_blocks.py (CPU) and tests/gpu/test_gpu_sp_blocks.py (CUDA kernels).
"""

from __future__ import annotations

import torch
from longctx.kernels.attention import block_attn, block_attn_bwd, merge
from longctx.parallel import allgather_kv, layout, token_ring
from longctx.parallel.blocks import attend, attend_bwd, merge_rows, q_rows

SCHEDULES = ("ring", "token_ring", "allgather_kv")  # bidir_kv's blocks are ring's, visited in another order


def _ring_family(name, shards, P, kernel):
    qs, ks, vs, dos = shards
    n = qs[0].shape[1]
    outs, lses = [], []
    for r in range(P):
        out, lse = attend(qs[r], ks[r], vs[r], r, r, kernel=kernel)
        out, lse = out.float(), lse.float().clone()
        for o in range(P):
            if o != r:
                part_out, part_lse = attend(qs[r], ks[o], vs[o], r, o, kernel=kernel)
                out, lse = merge_rows(out, lse, part_out, part_lse, q_rows(r, o, n))
        outs.append(out.to(qs[r].dtype))
        lses.append(lse)
    dq = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for q in qs]
    dk = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for k in ks]
    dv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for k in ks]
    for r in range(P):  # the queries (rows) of rank r against every rank's keys
        for o in range(P):
            out_used = outs[r]
            if name == "token_ring" and o != r:  # TokenRing ships s = D/|dO|^2 and rebuilds O' = s dO
                out_used = token_ring._stand_in_out(dos[r], token_ring._out_scale(dos[r], outs[r]))
            dq_b, dk_b, dv_b, kv_slice = attend_bwd(dos[r], qs[r], ks[o], vs[o], out_used, lses[r], r, o, kernel=kernel)
            dq[r][:, q_rows(r, o, n)] += dq_b.float()
            dk[o][:, kv_slice] += dk_b.float()
            dv[o][:, kv_slice] += dv_b.float()
    return outs, dq, dk, dv


def _allgather(shards, P, kernel, S):
    qs, ks, vs, dos = shards
    c = qs[0].shape[1] // 2
    k_all, v_all = (layout.unsplit(list(t), S + (-S) % (2 * P)) for t in (ks, vs))
    outs, lses = [], []
    for r in range(P):
        o_parts, l_parts = [], []
        for rows, blocks in allgather_kv._query_chunks(r, P, c):
            # the diagonal from the rank's own shard (local rows), as allgather_kv does while gathering
            out, lse = merge(None, None, *block_attn(qs[r][:, rows], ks[r][:, rows], vs[r][:, rows], True, impl=kernel))
            for keys, causal in blocks[1:]:
                out, lse = merge(out, lse, *block_attn(qs[r][:, rows], k_all[:, keys], v_all[:, keys], causal, impl=kernel))
            o_parts.append(out)
            l_parts.append(lse)
        outs.append(torch.cat(o_parts, 1).to(qs[r].dtype))
        lses.append(torch.cat(l_parts, 2))
    dq = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for q in qs]
    dk_all = torch.zeros(k_all.shape, dtype=torch.float32, device=k_all.device)
    dv_all = torch.zeros_like(dk_all)
    for r in range(P):
        for rows, blocks in allgather_kv._query_chunks(r, P, c):
            for i, (keys, causal) in enumerate(blocks):
                k_src, v_src = (ks[r][:, rows], vs[r][:, rows]) if i == 0 else (k_all[:, keys], v_all[:, keys])
                dq_b, dk_b, dv_b = block_attn_bwd(dos[r][:, rows], qs[r][:, rows], k_src, v_src,
                                                  outs[r][:, rows], lses[r][:, :, rows], causal, impl=kernel)
                dq[r][:, rows] += dq_b.float()
                dk_all[:, keys] += dk_b.float()
                dv_all[:, keys] += dv_b.float()
    dk = [layout.split(dk_all, r, P) for r in range(P)]
    dv = [layout.split(dv_all, r, P) for r in range(P)]
    return outs, dq, dk, dv


def emulate(name: str, q, k, v, dout, P: int, kernel: str):
    """(out, dq, dk, dv) of the whole sequence as `name` on P ranks computes them (fp32 grads)."""
    S = q.shape[1]
    shards = [[layout.split(t, r, P).contiguous() for r in range(P)] for t in (q, k, v, dout)]
    if name == "allgather_kv":
        parts = _allgather(shards, P, kernel, S)
    else:
        parts = _ring_family(name, shards, P, kernel)
    return tuple(layout.unsplit(list(p), S) for p in parts)


ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def whole(q, k, v, dout, kernel: str):
    """(out, dq, dk, dv) of one causal block over the whole sequence with the same kernel."""
    out, lse = block_attn(q, k, v, True, impl=kernel)
    return (out, *block_attn_bwd(dout, q, k, v, out, lse, True, impl=kernel))


def errors(got, want, base, dtype, P: int) -> list[str]:
    """Each of (out, dq, dk, dv) within twice the whole-sequence kernel's error against the fp32
    reference, times sqrt(P/2) (P partials, each rounded to the kernel's dtype, summed), plus two
    roundings of the largest value."""
    growth = max(1.0, P / 2) ** 0.5
    problems = []
    for g, w, b, what in zip(got, want, base, ("out", "dq", "dk", "dv")):
        err = (g.float() - w).abs().max().item()
        theirs = (b.float() - w).abs().max().item()
        bound = 2 * growth * theirs + 2 * ULP[dtype] * w.abs().max().item()
        if not err <= bound:
            problems.append(f"{what}: {err:.3g} > {bound:.3g} (whole-sequence kernel {theirs:.3g})")
    return problems
