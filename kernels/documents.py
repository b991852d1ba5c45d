"""Document masks for packed rows (issue 18): which (query, key) tiles of a block run, and the
block's forward and backward as one kernel call per tile (kernels/attention.py's block_attn and
block_attn_bwd call these when given document ids; see its docstring for the contract).

A query sees a key of its own document at a position <= its own. `document_tiles` cuts a block
into tiles, one per pair of runs of the same document (keys before every query of the run
unmasked, the overlap causal from its top left, the queries past the overlap against all of it),
so no Sq x Sk mask exists and a block with no visible pair runs nothing (out 0, lse -inf). The
tiles' partials merge by LSE; their backward against the block's (out, lse) sums to the block's.
"""

from __future__ import annotations

import numpy as np
import torch

from .merge import merge_into

Tile = tuple  # (query slice, key slice, causal)


def _ids_and_positions(docs, S: int, causal: bool, queries: bool):
    """(ids, positions) numpy [B, S] of a side of a block. `docs` is ids [B, S] or (ids,
    positions within their documents). Without positions, the block's own order stands in: a
    causal block's local index (top-left aligned), and for an unmasked block every key before
    every query."""
    if isinstance(docs, (tuple, list)):
        ids, pos = docs
        return ids.cpu().numpy(), pos.cpu().numpy()
    ids = docs.cpu().numpy()
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), ids.shape)
    return ids, pos + (1 << 40) if queries and not causal else pos


def _runs(ids: np.ndarray, pos: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(document id, start, stop, position at start) of each maximal run of one document whose
    positions go up by one."""
    cuts = np.flatnonzero((np.diff(ids) != 0) | (np.diff(pos) != 1)) + 1
    bounds = np.concatenate([[0], cuts, [len(ids)]]).tolist()
    return [(int(ids[a]), a, b, int(pos[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def document_tiles(q_docs, k_docs, causal: bool) -> list[list[Tile]]:
    """Per batch row, the tiles (query slice, key slice, causal) where a query sees a key: same
    document, key position <= query position. q_docs/k_docs: ids [B, S], or (ids, positions
    within the documents) when the block's rows are not in sequence order (a balanced layout,
    parallel/layout.py); then `causal` is not read. One tile per pair of runs of a document (keys
    before every query of the run unmasked, the overlap causal from its top left, and the
    queries past the overlap against all of it). Their union is exactly the visible pairs."""
    qi, qp = _ids_and_positions(q_docs, (q_docs[0] if isinstance(q_docs, (tuple, list)) else q_docs).shape[1], causal, True)
    ki, kp = _ids_and_positions(k_docs, (k_docs[0] if isinstance(k_docs, (tuple, list)) else k_docs).shape[1], causal, False)
    if qi.ndim != 2 or ki.ndim != 2 or qi.shape[0] != ki.shape[0]:
        raise ValueError(f"document ids must be [B, Sq] and [B, Sk], got {qi.shape} and {ki.shape}")
    out = []
    for b in range(qi.shape[0]):
        keys: dict[int, list[tuple[int, int, int]]] = {}
        for d, ka, kb, s0 in _runs(ki[b], kp[b]):
            keys.setdefault(d, []).append((ka, kb, s0))
        tiles = []
        for d, qa, qb, p0 in _runs(qi[b], qp[b]):
            p1 = p0 + qb - qa
            for ka, kb, s0 in keys.get(d, ()):
                s1 = s0 + kb - ka
                if s0 < p0:  # keys before every query of the run: no mask
                    tiles.append((slice(qa, qb), slice(ka, ka + min(s1, p0) - s0), False))
                lo, hi = max(s0, p0), min(s1, p1)
                if lo < hi:  # the overlap: queries at [lo, p1) see keys at [lo, hi) up to themselves
                    q_lo, q_hi, k_lo, k_hi = qa + lo - p0, qa + hi - p0, ka + lo - s0, ka + hi - s0
                    tiles.append((slice(q_lo, q_hi), slice(k_lo, k_hi), True))
                    if q_hi < qb:
                        tiles.append((slice(q_hi, qb), slice(k_lo, k_hi), False))
        out.append(tiles)
    return out


def documents_forward(forward, q, k, v, causal, tiles):
    B, Sq, Hq, D = q.shape
    acc = torch.zeros((B, Sq, Hq, D), dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for b, row in enumerate(tiles):
        r = slice(b, b + 1)
        seen = np.zeros(Sq, dtype=bool)  # rows that hold a partial already: the rest take theirs as is
        for qs, ks, c in row:
            out_t, lse_t = forward(q[r, qs], k[r, ks], v[r, ks], c)
            if seen[qs].any():
                merge_into(acc[r, qs], lse[r, :, qs], out_t, lse_t)
            else:
                acc[r, qs] = out_t
                lse[r, :, qs] = torch.where(torch.isposinf(lse_t), float("-inf"), lse_t.float())
            seen[qs] = True
    return acc.to(q.dtype), lse


def documents_backward(backward, dout, q, k, v, out, lse, causal, tiles):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for b, row in enumerate(tiles):
        r = slice(b, b + 1)
        for qs, ks, c in row:
            dq_t, dk_t, dv_t = backward(dout[r, qs], q[r, qs], k[r, ks], v[r, ks], out[r, qs],
                                        lse[r, :, qs].contiguous(), c)
            dq[r, qs] += dq_t
            dk[r, ks] += dk_t
            dv[r, ks] += dv_t
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
