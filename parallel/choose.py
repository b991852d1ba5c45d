"""`parallel.attention: auto`: pick the schedule with the least modelled time.

Per layer (forward + backward) each schedule does the same attention FLOPs, split into steps; a
step costs max(compute, transfer on its busiest link direction) plus a fixed per-step overhead
(launches, merges). Bytes per step follow from the head counts, head dim, local tokens n = S/P and
the dtype (zigzag: a travelling query block is full for half of the (rank, step) pairs and half
for the other half, 0.75 on average):
  ring       fwd P-1 steps of K+V; bwd P-1 steps of K+V and P of fp32 dK+dV, all on one direction
  bidir_kv   the same blocks split over both directions: about P/2 steps each way
  token_ring fwd Q one way, O+LSE back; bwd Q+dO+LSE+D one way, fp32 dQ back
  ulysses    two all-to-alls around one local attention (forward), four in backward, not overlapped
With GQA (Hq > Hkv) queries outweigh K/V, so K/V rings move fewer bytes than TokenRing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    """Bytes/s per link direction, seconds per message, attention FLOP/s per rank, per-step
    overhead, and device memory bandwidth (for the fp32 merges and copies between kernels)."""

    bandwidth: float
    latency: float
    flops: float
    step_overhead: float
    memory_bandwidth: float = 2e12
    name: str = "custom"


LINKS = {
    # measured-order-of-magnitude presets; `bench/sp_attention.py` prints what a machine achieves
    "cpu_gloo": LinkModel(bandwidth=1.5e9, latency=2e-4, flops=2.5e10, step_overhead=2e-3, memory_bandwidth=5e9,
                          name="cpu_gloo"),
    "nvlink": LinkModel(bandwidth=4.5e11, latency=1e-5, flops=4e14, step_overhead=2e-5, name="nvlink"),
    "pcie": LinkModel(bandwidth=2.5e10, latency=1e-5, flops=4e14, step_overhead=2e-5, name="pcie"),
    "infiniband": LinkModel(bandwidth=5e10, latency=5e-6, flops=4e14, step_overhead=2e-5, name="infiniband"),
}


@dataclass(frozen=True)
class Shape:
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    sp: int
    dtype_bytes: int = 2
    batch: int = 1


def _attention_flops(s: Shape) -> float:
    # causal: half of 4*S^2*Hq*d forward; backward ~2.5x forward
    return 0.5 * 4 * s.batch * s.seq_len**2 * s.heads_q * s.head_dim * 3.5


def estimate(schedule: str, s: Shape, link: LinkModel) -> dict:
    """Modelled seconds per layer (fwd+bwd) and bytes on the busiest link direction."""
    P, n, b, d = s.sp, s.batch * s.seq_len // s.sp, s.dtype_bytes, s.head_dim
    compute = _attention_flops(s) / P / link.flops
    kv = 2 * n * s.heads_kv * d * b
    q = n * s.heads_q * d * b
    lse = n * s.heads_q * 4
    # each ring step reads and writes the fp32 output (forward merge) or dQ (backward) accumulator
    merge = 3 * n * s.heads_q * d * 4 / link.memory_bandwidth
    if schedule == "ulysses":
        if s.heads_q % P:
            return {"seconds": float("inf"), "max_link_bytes": 0, "why": f"Hq={s.heads_q} not divisible by sp={P}"}
        kv_heads = s.heads_kv if s.heads_kv % P == 0 else s.heads_q
        per_peer_fwd = n / P * (s.heads_q + 2 * kv_heads) * d * b + n / P * s.heads_q * d * b
        per_peer = per_peer_fwd * 3  # backward moves the gradients of the same tensors twice over
        comm = per_peer * (P - 1) / link.bandwidth + 6 * link.latency  # all peers share a rank's egress
        copies = 4 * (2 * q + kv) / link.memory_bandwidth  # re-layout around both all-to-alls, fwd and bwd
        return {"seconds": compute + comm + copies + 2 * link.step_overhead, "max_link_bytes": per_peer}
    if schedule == "ring":
        steps_fwd, steps_bwd = P, P
        fwd_bytes, bwd_bytes = kv, kv + 2 * n * s.heads_kv * d * 4
    elif schedule == "bidir_kv":
        steps_fwd = steps_bwd = P // 2 + 1
        fwd_bytes, bwd_bytes = kv, kv + 2 * n * s.heads_kv * d * 4
    elif schedule == "token_ring":
        steps_fwd = steps_bwd = P
        fwd_bytes = 0.75 * q  # the return channel runs the other way at the same time
        bwd_bytes = 0.75 * (2 * q + 2 * lse)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    def per_step(steps, nbytes):
        return max(compute / 2 / steps, nbytes / link.bandwidth + link.latency)
    seconds = steps_fwd * per_step(steps_fwd, fwd_bytes) + steps_bwd * per_step(steps_bwd, bwd_bytes)
    seconds += (steps_fwd + steps_bwd) * (link.step_overhead + merge)
    links = (P - 1) * (fwd_bytes + bwd_bytes) if schedule != "bidir_kv" else (P // 2) * (fwd_bytes + bwd_bytes)
    return {"seconds": seconds, "max_link_bytes": links}


def choose(s: Shape, link: LinkModel, candidates=("token_ring", "ring", "bidir_kv", "ulysses")) -> tuple[str, str]:
    """(schedule, reason) with the least modelled time."""
    costs = {c: estimate(c, s, link) for c in candidates}
    best = min(costs, key=lambda c: costs[c]["seconds"])
    table = ", ".join(
        f"{c} {v['seconds'] * 1e3:.2f} ms" + (f" ({v['why']})" if "why" in v else "") for c, v in costs.items()
    )
    reason = (f"heads {s.heads_q}/{s.heads_kv}, head_dim {s.head_dim}, seq {s.seq_len}, sp {s.sp}, link "
              f"{link.name}: modelled per layer {table}")
    return best, reason
