"""Bidirectional K/V ring: every rank receives K/V blocks from both neighbours at once, so the
ring is covered in about P/2 steps and both directions of every link carry K/V (the KV-passing
counterpart of TokenRing's two-direction idea; zigzag causal rule as in ring.py).

Forward, step s: attend to the block of rank r-s (clockwise chain) and of rank r+s
(counter-clockwise chain; skipped when P is even and s = P/2, where both chains meet).
Backward: the blocks travel again; each rank sends its partial dK/dV (fp32) straight back to the
block's owner one step later, overlapped with the next blocks; dQ accumulates locally. Every
step posts the next blocks (clockwise on the ring channel, counter-clockwise and the returns on
the return channel, parallel/p2p.py) before it computes and waits after.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .blocks import Documents, ScheduleAttention, attend, attend_bwd, merge_rows, q_rows
from .p2p import communicator, compute


def _sources(r: int, step: int, P: int) -> list[int]:
    if step == 0:
        return [r]
    cw, ccw = (r - step) % P, (r + step) % P
    return [cw] if cw == ccw else [cw, ccw]


def _steps(P: int) -> int:
    return P // 2


def _post_blocks(comm, step: int, P: int, cw, ccw):
    """Posts the K/V each chain needs for `step`; returns (pending, cw buffers, ccw buffers or None)."""
    need_ccw = (comm.rank + step) % P != (comm.rank - step) % P
    sends = [(cw[0], comm.next), (cw[1], comm.next)]
    new_cw = (torch.empty_like(cw[0]), torch.empty_like(cw[1]))
    recvs = [(new_cw[0], comm.prev), (new_cw[1], comm.prev)]
    new_ccw = None
    if need_ccw:
        sends += [(ccw[0], comm.prev), (ccw[1], comm.prev)]
        new_ccw = (torch.empty_like(ccw[0]), torch.empty_like(ccw[1]))
        recvs += [(new_ccw[0], comm.next), (new_ccw[1], comm.next)]
    pending = [comm.exchange(sends[:2], recvs[:2], what=f"kv {step}")]
    if need_ccw:  # the counter-clockwise chain on the return channel: both link directions busy
        pending.append(comm.exchange(sends[2:], recvs[2:], channel="return", what=f"kv {step}"))
    return _Both(pending), new_cw, new_ccw


class _Both:
    def __init__(self, pendings) -> None:
        self.pendings = pendings

    def wait(self) -> None:
        for p in self.pendings:
            p.wait()


def forward(group: dist.ProcessGroup, q, k, v, kernel: str = "auto", docs=None):
    comm = communicator(group)
    P, r, n = comm.world, comm.rank, q.shape[1]
    docs = Documents.of(docs, P)
    cw = ccw = (k, v)
    out = lse = None
    for step in range(_steps(P) + 1):
        pending = _post_blocks(comm, step + 1, P, cw, ccw) if step < _steps(P) else None
        blocks = [cw] if step == 0 else [cw] + ([ccw] if ccw is not None else [])
        with compute(f"step {step}"):
            for (bk, bv), src in zip(blocks, _sources(r, step, P)):
                part_out, part_lse = attend(q, bk, bv, r, src, kernel=kernel, docs=docs)
                if out is None:
                    out, lse = part_out.float(), part_lse.float()
                else:
                    out, lse = merge_rows(out, lse, part_out, part_lse, q_rows(r, src, n, docs))
        if pending is not None:
            work, cw, ccw = pending
            work.wait()
    return out.to(q.dtype), lse


def backward(group: dist.ProcessGroup, dout, q, k, v, out, lse, kernel: str = "auto", docs=None):
    comm = communicator(group)
    P, r, n = comm.world, comm.rank, q.shape[1]
    docs = Documents.of(docs, P)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    cw = ccw = (k, v)
    returns: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # partial dK/dV for other owners
    for step in range(_steps(P) + 1):
        # last step's partials go home while this step computes; ours arrive from the same ranks
        inbound = [(torch.empty_like(dk), torch.empty_like(dv), peer) for peer in _sources(r, step - 1, P)] \
            if step > 1 else []
        sends = [(t, peer) for pk, pv, peer in returns for t in (pk, pv)]
        recvs = [(t, peer) for pk, pv, peer in inbound for t in (pk, pv)]
        # the next blocks first: on NCCL the return channel runs in order, so the counter-clockwise
        # block the next step computes with goes ahead of the partials, needed only at the step's end
        pending = _post_blocks(comm, step + 1, P, cw, ccw) if step < _steps(P) else None
        ret_pending = comm.exchange(sends, recvs, channel="return", what=f"partial {step - 1}") if sends else None
        blocks = [cw] if step == 0 else [cw] + ([ccw] if ccw is not None else [])
        returns = []
        with compute(f"step {step}"):
            for (bk, bv), src in zip(blocks, _sources(r, step, P)):
                dq_part, dk_part, dv_part, ks = attend_bwd(dout, q, bk, bv, out, lse, r, src, kernel=kernel,
                                                              docs=docs)
                dq[:, q_rows(r, src, n, docs)] += dq_part.float()
                part_k = torch.zeros_like(dk)
                part_v = torch.zeros_like(dv)
                part_k[:, ks], part_v[:, ks] = dk_part.float(), dv_part.float()
                if src == r:
                    dk += part_k
                    dv += part_v
                else:
                    returns.append((part_k, part_v, src))
        if ret_pending is not None:
            ret_pending.wait()
            for pk, pv, _ in inbound:
                dk += pk
                dv += pv
        if pending is not None:
            work, cw, ccw = pending
            work.wait()
    if returns:  # the last step's partials
        inbound = [(torch.empty_like(dk), torch.empty_like(dv), peer) for peer in _sources(r, _steps(P), P)]
        comm.exchange([(t, peer) for pk, pv, peer in returns for t in (pk, pv)],
                      [(t, peer) for pk, pv, peer in inbound for t in (pk, pv)], channel="return",
                      what=f"partial {_steps(P)}").wait()
        for pk, pv, _ in inbound:
            dk += pk
            dv += pv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def bidir_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
        kernel: str = "auto", docs=None) -> torch.Tensor:
    """Causal attention over a zigzag-sharded sequence; same contract as ring.ring_attention."""
    return ScheduleAttention.apply(q, k, v, group, sys.modules[__name__], kernel, docs)
