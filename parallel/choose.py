"""`parallel.attention: auto`: the cost model that picks a sequence-parallel schedule.

One layer's causal attention, forward + backward, for `batch` rows of `seq_len` tokens on an sp
group of P consecutive global ranks (parallel/mesh.py), on a Machine (parallel/topology.py: link
classes intra/inter node, attention FLOP/s, per-step overhead, memory bandwidth).

Bytes each rank sends per layer (`bytes_moved`, the hand formulas the tests and bench/sp_attention.py
check). n = seq_len/P tokens per rank, b bytes per element, B rows; q = B n Hq d b, kv = 2 B n Hkv d b
(K and V), lse = B n Hq 4, dq32 = B n Hq d 4, dkv32 = 2 B n Hkv d 4 (fp32 gradients):
  ring         fwd (P-1) kv                      bwd (P-1) kv + P dkv32 (the accumulator rides the ring home)
  bidir_kv     fwd (P-1) kv (both directions)    bwd (P-1) kv + (P-1) dkv32 (partials straight to their owners)
  token_ring   fwd 0.75 (P-1) (q + q + lse)      bwd 0.75 (P-1) (2q + 2lse + dq32)
               (query bundle one way: q, or q, dO, s = D/|dO|^2 and lse; partial out+lse or dQ back; zigzag: a travelling block is full for
               half the (rank, step) pairs and half size for the rest, 0.75 on average)
  allgather_kv fwd (P-1) kv                      bwd (P-1) kv + (P-1) dkv32 (all-gather again, reduce-scatter)
  ulysses      fwd (P-1)/P (q + kv' + q)         bwd (P-1)/P (q + q + kv')   all-to-alls; kv' = kv with
               Hkv replaced by Hq when Hkv % P (K/V heads repeated); under MEMO (Shape.memo) the
               backward scatters q, k, v, out and dO again: bwd (P-1)/P (3q + kv' + q + kv')
  hybrid       Ulysses' all-to-alls over u = sp_inner consecutive ranks (inner_*), then the outer schedule
               over r = P/u ranks on seq_len tokens with Hq/u and Hkv/u heads (Hq/u when Hkv % u) (outer_*)

Time (`estimate`) follows the overlap each schedule's code has. A step costs
overlap(compute, transfer) + step_overhead, overlap(c, t) = max(c, t) + (1 - machine.overlap) min(c, t):
  ring, bidir_kv, token_ring  post the next block's transfer before computing the current one and wait
               after; ring's backward also has last step's dK/dV accumulator in flight; bidir_kv's last
               returns and TokenRing's last return are exposed; TokenRing's query and return channels
               run at once in opposite directions (two process groups)
  allgather_kv its all-gathers overlap the two diagonal blocks (local keys, 1/2P of its work), the
               reduce-scatter is exposed
  ulysses, hybrid's inner all-to-alls   exposed: nothing computes while they run
All-gather and reduce-scatter are rings of P-1 hops on NCCL; on gloo they, and all-to-alls, are
one batch of transfers to every peer (p2p.Communicator.to_every_peer).
A transfer phase lasts as long as its busiest port or pair link over all ranks and link classes
(topology.transfer_seconds), so a ring spanning nodes waits for its node-boundary hop, and the
critical path of TokenRing's zigzag carries a full query block every step. Compute: causal forward
2 B S^2 Hq d FLOPs, backward 2.5x, split evenly over ranks and steps (zigzag), plus the fp32 merges
and layout copies at memory bandwidth, plus the diagonal tiles a causal kernel computes whole
(Machine.causal_tile T: a causal block of L rows runs at L/(L+T) of the unmasked rate; every
schedule loses about n T Hq per rank that way, so it shifts times, not their order). Time only: whether a schedule's buffers fit (Ulysses holds
the whole sequence for Hq/P heads) is memory/estimate.py's question.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

from .topology import BACKWARD_FLOPS, Machine, flops_text, node_of, transfer_seconds

SCHEDULES = ("token_ring", "ring", "bidir_kv", "allgather_kv", "ulysses", "hybrid")
OUTER = ("token_ring", "ring", "bidir_kv", "allgather_kv")
# Passes over an fp32 buffer (read or write, each counted) of the elementwise work between kernels
MERGE_PASSES = 5  # merge_into (out, lse) <- partial, in place: out *= w (read, write), out += part * w' (read both, write)
ADD_PASSES = 3  # acc += part: read both, write one


@dataclass(frozen=True)
class Shape:
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    sp: int
    dtype_bytes: int = 2
    batch: int = 1
    # memory.policy full or memo keeps (out, lse) and runs the schedule's own backward
    # (memory/offload.py; "memo" here for short): for Ulysses
    # (and hybrid's inner part) that scatters q, k, v, out and dO to heads again, where autograd
    # kept the head-layout tensors and scatters only dO
    memo: bool = False


@dataclass(frozen=True)
class Choice:
    name: str
    outer: str | None
    sp_inner: int | None
    why: str
    table: dict  # schedule -> estimate(...)


@dataclass(frozen=True)
class _Sizes:
    """Per-rank tensor bytes of a shape (module docstring)."""

    q: float
    kv: float
    lse: float
    dq32: float
    dkv32: float

    @classmethod
    def of(cls, s: Shape, heads_kv: int | None = None) -> _Sizes:
        rows = s.batch * s.seq_len / s.sp
        hkv = s.heads_kv if heads_kv is None else heads_kv
        return cls(rows * s.heads_q * s.head_dim * s.dtype_bytes, 2 * rows * hkv * s.head_dim * s.dtype_bytes,
                   rows * s.heads_q * 4, rows * s.heads_q * s.head_dim * 4, 2 * rows * hkv * s.head_dim * 4)


def _a2a_kv_heads(s: Shape, degree: int) -> int:
    """K/V heads through a Ulysses all-to-all of `degree` ranks (repeated up to Hq if they do not split)."""
    return s.heads_kv if s.heads_kv % degree == 0 else s.heads_q


def _outer_shape(s: Shape, u: int) -> Shape:
    return replace(s, heads_q=s.heads_q // u, heads_kv=_a2a_kv_heads(s, u) // u, sp=s.sp // u)


def _inner_shape(s: Shape, u: int) -> Shape:
    """Ulysses over an inner group: u ranks holding seq_len/P tokens each."""
    return replace(s, seq_len=s.seq_len * u // s.sp, sp=u)


def impossible(schedule: str, s: Shape, sp_inner: int | None = None) -> str | None:
    """Why `schedule` cannot run this shape, or None."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if s.sp < 2:
        return f"sp {s.sp}: attention is local"
    if schedule == "ulysses" and s.heads_q % s.sp:
        return f"Hq {s.heads_q} % sp {s.sp}"
    if schedule == "hybrid":
        u = sp_inner
        if u is None or not 1 < u < s.sp or s.sp % u:
            return f"sp_inner {u} is not a divisor of sp {s.sp} between 1 and sp"
        if s.heads_q % u:
            return f"Hq {s.heads_q} % sp_inner {u}"
    return None


# --- bytes: the hand formulas -------------------------------------------------------------------
def bytes_moved(schedule: str, shape: Shape, sp_inner: int | None = None, outer: str | None = None) -> dict:
    """Bytes one rank sends per layer, {"fwd": {kind: bytes}, "bwd": {kind: bytes}, "total": bytes}
    (the mean over ranks: TokenRing's zigzag ranks differ; the others send alike)."""
    reason = impossible(schedule, shape, sp_inner)
    if reason:
        raise ValueError(f"{schedule} cannot run this shape: {reason}")
    P, z = shape.sp, _Sizes.of(shape)
    if schedule == "ring":
        fwd, bwd = {"kv": (P - 1) * z.kv}, {"kv": (P - 1) * z.kv, "dkv_fp32": P * z.dkv32}
    elif schedule == "bidir_kv":
        fwd, bwd = {"kv": (P - 1) * z.kv}, {"kv": (P - 1) * z.kv, "dkv_fp32": (P - 1) * z.dkv32}
    elif schedule == "token_ring":
        hops = 0.75 * (P - 1)
        fwd = {"q": hops * z.q, "out_lse": hops * (z.q + z.lse)}
        bwd = {"q_dout_scale_lse": hops * (2 * z.q + 2 * z.lse), "dq_fp32": hops * z.dq32}
    elif schedule == "allgather_kv":
        fwd = {"all_gather_kv": (P - 1) * z.kv}
        bwd = {"all_gather_kv": (P - 1) * z.kv, "reduce_scatter_dkv_fp32": (P - 1) * z.dkv32}
    elif schedule == "ulysses":
        share, kv = (P - 1) / P, _Sizes.of(shape, _a2a_kv_heads(shape, P)).kv
        fwd = {"a2a_qkv": share * (z.q + kv), "a2a_out": share * z.q}
        if shape.memo:
            bwd = {"a2a_qkv_out_dout": share * (3 * z.q + kv), "a2a_dqkv": share * (z.q + kv)}
        else:
            bwd = {"a2a_dout": share * z.q, "a2a_dqkv": share * (z.q + kv)}
    else:  # hybrid
        if outer not in OUTER:
            raise ValueError(f"hybrid needs an outer schedule among {OUTER}, got {outer!r}")
        inner = bytes_moved("ulysses", _inner_shape(shape, sp_inner))
        across = bytes_moved(outer, _outer_shape(shape, sp_inner))
        fwd = {**{f"inner_{k}": v for k, v in inner["fwd"].items()}, **{f"outer_{k}": v for k, v in across["fwd"].items()}}
        bwd = {**{f"inner_{k}": v for k, v in inner["bwd"].items()}, **{f"outer_{k}": v for k, v in across["bwd"].items()}}
    return {"fwd": fwd, "bwd": bwd, "total": sum(fwd.values()) + sum(bwd.values())}


# --- steps: (repeat, compute seconds, flows [(src, dst, bytes)] in flight meanwhile[, "all_gather"]);
# "all_gather" marks a phase that sends to every peer at once (all-gather, all-to-all, reduce-scatter
# on gloo), which runs at LinkClass.all_gather_efficiency of the link's rate
def _ring_flows(groups, nbytes, hop=1):
    return [(g[i], g[(i + hop) % len(g)], nbytes) for g in groups for i in range(len(g))]


def _a2a_flows(groups, per_peer):
    return [(a, b, per_peer) for g in groups for a in g for b in g if a != b]


def _layer_compute(s: Shape, m: Machine) -> tuple[float, float]:
    """(forward, backward) seconds of one rank's share of the layer's attention FLOPs."""
    flops = 2.0 * s.batch * s.seq_len**2 * s.heads_q * s.head_dim / s.sp
    return flops / m.flops, BACKWARD_FLOPS * flops / m.flops


def _causal_blocks(schedule: str, s: Shape, sp_inner: int | None = None, outer: str | None = None) -> list:
    """[(rows L, useful forward FLOPs)] of the causal blocks one rank runs per layer: the local
    diagonal block of the ring schedules (L = S/P), allgather_kv's two chunk diagonals (S/2P),
    Ulysses' whole sequence on Hq/P heads, hybrid's outer schedule on Hq/u heads over P/u ranks."""
    n, hd = s.seq_len / s.sp, s.batch * s.head_dim
    if schedule in ("ring", "bidir_kv", "token_ring"):
        return [(n, 2 * n * n * s.heads_q * hd)]
    if schedule == "allgather_kv":
        return [(n / 2, 2 * (n / 2) ** 2 * s.heads_q * hd)] * 2
    if schedule == "ulysses":
        return [(s.seq_len, 2 * s.seq_len**2 * s.heads_q / s.sp * hd)]
    return _causal_blocks(outer, _outer_shape(s, sp_inner))


def _causal_waste(schedule: str, s: Shape, m: Machine, sp_inner: int | None, outer: str | None) -> float:
    """Seconds (fwd + bwd) a causal kernel spends on the diagonal tiles it computes whole
    (Machine.causal_tile)."""
    return sum(f * m.causal_tile / L for L, f in _causal_blocks(schedule, s, sp_inner, outer)) \
        * (1 + BACKWARD_FLOPS) / m.flops


def _step_compute(s: Shape, m: Machine, fwd_passes: float, bwd_passes: float) -> tuple[float, float]:
    """(forward, backward) seconds of one zigzag block step on one rank: 1/P of the rank's FLOPs
    (every step of every ring schedule does as much, parallel/blocks.py) plus the given bytes of
    elementwise work at memory bandwidth."""
    f, b = _layer_compute(s, m)
    return f / s.sp + fwd_passes / m.memory_bandwidth, b / s.sp + bwd_passes / m.memory_bandwidth


def _ring_steps(s, m, groups):
    P, z = s.sp, _Sizes.of(s)
    # bwd: dQ += the block's; the block's dK/dV added into the received accumulator
    cf, cb = _step_compute(s, m, MERGE_PASSES * z.dq32, ADD_PASSES * z.dq32 + ADD_PASSES * z.dkv32)
    kv, acc = _ring_flows(groups, z.kv), _ring_flows(groups, z.dkv32)
    fwd = [(P - 1, cf, kv), (1, cf, [])]
    # bwd step t: next K/V and step t-1's accumulator in flight; the last accumulator goes home exposed
    bwd = [(1, cb, kv), (P - 2, cb, kv + acc), (1, cb, acc), (1, 0.0, acc)]
    return fwd, bwd


def _bidir_steps(s, m, groups):
    P, z = s.sp, _Sizes.of(s)
    # per block; bwd: dQ += the block's, a zeroed fp32 dK/dV partial filled (or added to the local one)
    cf, cb = _step_compute(s, m, MERGE_PASSES * z.dq32, ADD_PASSES * z.dq32 + (2 + ADD_PASSES) * z.dkv32)
    last = P // 2

    def blocks(t):  # step 0: the local block; P even: the chains meet at P/2 (one block)
        return 1 if t == 0 or (P % 2 == 0 and t == last) else 2

    def kv_for(t):  # blocks posted during step t for step t+1: clockwise, and counter-clockwise unless they meet
        return _ring_flows(groups, z.kv) + (_ring_flows(groups, z.kv, -1) if (2 * (t + 1)) % P else [])

    def returns(t):  # step t's partial dK/dV (fp32), straight to the blocks' owners (distance t)
        return _ring_flows(groups, z.dkv32, -t) + (_ring_flows(groups, z.dkv32, t) if (2 * t) % P else [])

    fwd = [(1, blocks(t) * cf, kv_for(t) if t < last else []) for t in range(last + 1)]
    bwd = [(1, blocks(t) * cb, (kv_for(t) if t < last else []) + (returns(t - 1) if t > 1 else []))
           for t in range(last + 1)] + [(1, 0.0, returns(last))]
    return fwd, bwd


def _token_ring_steps(s, m, groups):
    """Queries of owner (i + t) mod P sit on rank i at step t and travel to rank i-1 (full when that
    rank's chunks come after the owner's first chunk, else the late half); a partial computed at
    step t goes home to its owner during step t+1."""
    P, n = s.sp, s.batch * s.seq_len / s.sp
    hq, d, b = s.heads_q, s.head_dim, s.dtype_bytes
    z = _Sizes.of(s)
    # bwd: the returned dQ added, the block's dK/dV added locally, O' = s * dO rebuilt (read dO, write O')
    cf, cb = _step_compute(s, m, MERGE_PASSES * z.dq32, ADD_PASSES * (z.dq32 + z.dkv32) + 2 * z.q)
    per_row = {"fwd": (hq * d * b, hq * d * b + hq * 4), "bwd": (2 * hq * d * b + 2 * hq * 4, hq * d * 4)}

    def travel(t, row_bytes):
        return [(g[i], g[(i - 1) % P], row_bytes * (n if (i + t) % P > (i - 1) % P else n / 2))
                for g in groups for i in range(P)]

    def home(t, row_bytes):  # the partial of step t: rows of owner o that rank i's keys see
        return [(g[i], g[(i + t) % P], row_bytes * (n if i < (i + t) % P else n / 2)) for g in groups for i in range(P)]

    phases = {}
    for way, (q_row, ret_row) in per_row.items():
        c = cf if way == "fwd" else cb
        phases[way] = [(1, c, (travel(t, q_row) if t < P - 1 else []) + (home(t - 1, ret_row) if t > 1 else []))
                       for t in range(P)] + [(1, 0.0, home(P - 1, ret_row))]
    return phases["fwd"], phases["bwd"]


def _allgather_steps(s, m, groups):
    """All-gather and reduce-scatter run as rings on NCCL (P-1 hops of one rank's shard each) and
    as one batch of sends to every peer on gloo (allgather_kv.all_gather/reduce_scatter). The
    gathers overlap the two diagonal blocks, 1/2P of the rank's work (their keys are local); the
    reduce-scatter is exposed."""
    P, z = s.sp, _Sizes.of(s)
    f, b = _layer_compute(s, m)

    def gather(diagonal):  # the diagonal blocks compute while the first (or only) phase is in flight
        if m.intra.name == "cpu_gloo":
            return [(1, diagonal, _a2a_flows(groups, z.kv), "all_gather")]
        return [(1, diagonal, _ring_flows(groups, z.kv), "all_gather"), (P - 2, 0.0, _ring_flows(groups, z.kv),
                                                                          "all_gather")]
    # the gathered shards put in natural order (gather buffer, unsplit); two query chunks, each a causal
    # and an unmasked block merged once (half the rows each); backward: dQ added per block, and the
    # whole sequence's fp32 dK/dV zeroed, added to, split into pieces, received and summed
    copies, merges, adds = 3 * P * z.kv, MERGE_PASSES * z.dq32, 2 * ADD_PASSES * z.dq32
    fwd = gather(f / (2 * P)) + [(1, f * (1 - 1 / (2 * P)) + (copies + merges) / m.memory_bandwidth, [])]
    if m.intra.name == "cpu_gloo":  # gloo has no reduce-scatter: one all-to-all of the pieces, a local sum
        scatter = [(1, 0.0, _a2a_flows(groups, z.dkv32), "all_gather")]
    else:  # NCCL's reduce-scatter: a ring of P-1 hops
        scatter = [(P - 1, 0.0, _ring_flows(groups, z.dkv32))]
    bwd = gather(b / (2 * P)) + [(1, b * (1 - 1 / (2 * P)) + (copies + adds + 8 * P * z.dkv32) / m.memory_bandwidth,
                                  [])] + scatter
    return fwd, bwd


def _a2a_steps(s, m, groups, tensors):
    """One exposed all-to-all per tensor (bytes per rank) over each group, plus its layout copies."""
    P = s.sp
    return [(1, 4 * t / m.memory_bandwidth, _a2a_flows(groups, t / P), "all_gather") for t in tensors]


def _ulysses_steps(s, m, groups):
    z, kv = _Sizes.of(s), _Sizes.of(s, _a2a_kv_heads(s, s.sp)).kv
    f, b = _layer_compute(s, m)  # one kernel on Hq/P heads of the whole sequence, nothing to merge
    fwd = _a2a_steps(s, m, groups, [z.q, kv / 2, kv / 2]) + [(1, f, [])] + _a2a_steps(s, m, groups, [z.q])
    bwd = _a2a_steps(s, m, groups, _ulysses_bwd_in(s, z, kv)) + [(1, b, [])] \
        + _a2a_steps(s, m, groups, [z.q, kv / 2, kv / 2])
    return fwd, bwd


def _ulysses_bwd_in(s: Shape, z: _Sizes, kv: float) -> list[float]:
    """What the backward scatters to heads first: dO (autograd), or q, k, v, out and dO (MEMO)."""
    return [z.q, kv / 2, kv / 2, z.q, z.q] if s.memo else [z.q]


def _hybrid_steps(s, m, ranks, u, outer):
    r = s.sp // u
    inner_groups = [ranks[j * u:(j + 1) * u] for j in range(r)]
    outer_groups = [ranks[i::u] for i in range(u)]
    inner = _inner_shape(s, u)
    z, kv = _Sizes.of(inner), _Sizes.of(inner, _a2a_kv_heads(s, u)).kv
    o_fwd, o_bwd = _STEPS[outer](_outer_shape(s, u), m, outer_groups)
    fwd = _a2a_steps(inner, m, inner_groups, [z.q, kv / 2, kv / 2]) + o_fwd + _a2a_steps(inner, m, inner_groups, [z.q])
    bwd = _a2a_steps(inner, m, inner_groups, _ulysses_bwd_in(inner, z, kv)) + o_bwd \
        + _a2a_steps(inner, m, inner_groups, [z.q, kv / 2, kv / 2])
    return fwd, bwd


_STEPS = {"ring": _ring_steps, "bidir_kv": _bidir_steps, "token_ring": _token_ring_steps,
          "allgather_kv": _allgather_steps, "ulysses": _ulysses_steps}


def _run(steps, m: Machine) -> dict:
    seconds = compute = overhead = 0.0
    sent: dict = defaultdict(float)
    for repeat, c, flows, *kind in steps:
        if repeat <= 0:
            continue
        t, by_class = transfer_seconds(flows, m, all_gather=kind == ["all_gather"])
        seconds += repeat * (max(c, t) + (1.0 - m.overlap) * min(c, t) + m.step_overhead)
        compute += repeat * c
        overhead += repeat * m.step_overhead
        for key, nbytes in by_class.items():
            sent[key] += repeat * nbytes
    return {"seconds": seconds, "compute": compute, "overhead": overhead, "sent": sent}


# --- the estimate and the choice ---------------------------------------------------------------
def default_sp_inner(shape: Shape, machine: Machine) -> int:
    """The largest divisor of sp that divides the ranks per node and Hq (parallel/mesh.py
    resolve_sp_inner: inner groups never straddle two nodes)."""
    from .mesh import resolve_sp_inner

    return resolve_sp_inner("auto", shape.sp, shape.heads_q, machine.ranks_per_node)


def estimate(schedule: str, shape: Shape, machine: Machine, sp_inner: int | None = None, outer: str | None = None,
             first_rank: int = 0) -> dict:
    """Modelled seconds of one layer's attention fwd+bwd on the sp group of global ranks
    first_rank .. first_rank+sp-1, and bytes the busiest rank sends per link class:
    {"seconds", "fwd_seconds", "bwd_seconds", "compute_seconds", "bytes_intra", "bytes_inter",
    "bytes_per_rank" (mean, = bytes_moved's total), "bound"; hybrid: "sp_inner", "outer", "outers"
    (seconds per outer schedule); "why" when it cannot run (seconds inf)}."""
    if schedule == "hybrid" and sp_inner is None:
        sp_inner = default_sp_inner(shape, machine)
    if schedule == "hybrid" and outer is not None and outer not in OUTER:
        raise ValueError(f"hybrid's outer schedule {outer!r}: expected one of {', '.join(OUTER)}")
    reason = impossible(schedule, shape, sp_inner)
    if reason:
        return {"seconds": math.inf, "bytes_intra": 0.0, "bytes_inter": 0.0, "why": reason}
    if schedule == "hybrid" and outer is None:
        options = {o: estimate("hybrid", shape, machine, sp_inner, o, first_rank) for o in OUTER}
        best = min(options, key=lambda o: options[o]["seconds"])
        return {**options[best], "outers": {o: e["seconds"] for o, e in options.items()}}
    ranks = list(range(first_rank, first_rank + shape.sp))
    if schedule == "hybrid":
        fwd, bwd = _hybrid_steps(shape, machine, ranks, sp_inner, outer)
    else:
        fwd, bwd = _STEPS[schedule](shape, machine, [ranks])
    f, b = _run(fwd, machine), _run(bwd, machine)
    waste = _causal_waste(schedule, shape, machine, sp_inner, outer)
    seconds, compute = f["seconds"] + b["seconds"] + waste, f["compute"] + b["compute"] + waste
    waiting = seconds - compute - f["overhead"] - b["overhead"]
    sent = defaultdict(float)
    for part in (f, b):
        for key, nbytes in part["sent"].items():
            sent[key] += nbytes
    result = {
        "seconds": seconds, "fwd_seconds": f["seconds"], "bwd_seconds": b["seconds"], "compute_seconds": compute,
        "bytes_intra": max((v for (_, c), v in sent.items() if c == "intra"), default=0.0),
        "bytes_inter": max((v for (_, c), v in sent.items() if c == "inter"), default=0.0),
        "bytes_per_rank": sum(sent.values()) / shape.sp,
        "bound": "compute-bound" if waiting <= 0.05 * seconds else f"{100 * waiting / seconds:.0f}% waiting on links",
    }
    if schedule == "hybrid":
        result.update(sp_inner=sp_inner, outer=outer)
    return result


def label(name: str, entry: dict) -> str:
    """`hybrid (ulysses 8 x ring 4)` for hybrid, else the name."""
    if name != "hybrid" or "outer" not in entry:
        return name
    return f"hybrid (ulysses {entry['sp_inner']} x {entry['outer']})"


def _header(s: Shape, m: Machine) -> str:
    nodes = len({node_of(r, m) for r in range(s.sp)})
    links = f"{m.intra.name} {m.intra.out_bytes_per_s / 1e9:.3g} GB/s"
    if nodes > 1:
        links += f" + {m.inter.name} {m.inter.out_bytes_per_s / 1e9:.3g} GB/s"
    return (f"heads {s.heads_q}/{s.heads_kv} d{s.head_dim}, {s.seq_len} tokens x{s.batch}, sp {s.sp} on {nodes} "
            f"node{'s' if nodes > 1 else ''} ({links}, {flops_text(m.flops)})")


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms" if seconds < 10 else f"{seconds:.4g} s"


def choose(shape: Shape, machine: Machine, candidates=SCHEDULES, sp_inner: int | None = None) -> Choice:
    """The candidate with the least modelled time (the first listed on a tie). Hybrid is a
    candidate only when its Ulysses degree u (sp_inner, or default_sp_inner) has 1 < u < sp; its
    outer schedule is chosen too."""
    u = default_sp_inner(shape, machine) if sp_inner is None else sp_inner
    table = {}
    for name in candidates:
        if name == "hybrid" and not 1 < u < shape.sp:
            continue
        table[name] = estimate(name, shape, machine, sp_inner=u if name == "hybrid" else None)
    runnable = [c for c in table if math.isfinite(table[c]["seconds"])]
    if not runnable:
        reasons = {c: e["why"] for c, e in table.items()}
        if "hybrid" in candidates and "hybrid" not in table:
            reasons["hybrid"] = f"inner degree {u} is not between 1 and sp {shape.sp}"
        raise ValueError(f"no schedule among {list(candidates)} can run {shape}: "
                         + "; ".join(f"{c}: {why}" for c, why in reasons.items()))
    best = min(runnable, key=lambda c: table[c]["seconds"])

    def entry(c, e):
        if not math.isfinite(e["seconds"]):
            return f"{c} n/a ({e['why']})"
        return f"{label(c, e)} {_duration(e['seconds'])} ({e['bound']})"

    why = f"{_header(shape, machine)}: " + ", ".join(entry(c, e) for c, e in table.items())
    why += f"; picked {label(best, table[best])}"
    pick = table[best]
    return Choice(best, pick.get("outer"), pick.get("sp_inner"), why, table)
