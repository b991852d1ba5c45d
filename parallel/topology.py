"""The machine that parallel/choose.py prices attention schedules on: link classes, ranks per
node, attention FLOP/s, and how a run finds them at start-up.

A rank talks to peers on its own node over the intra-node class and to other nodes over the
inter-node class (its NIC). A class is either one shared port per rank (NVSwitch, a NIC, CPU
gloo: every peer shares the rank's egress and ingress) or pairwise (PCIe P2P, a direct NVLink
mesh: a private link per peer pair). `transfer_seconds` turns one phase of transfers that are in
flight together into seconds: the busiest port or pair link of any rank, per class, egress and
ingress alike, plus the slowest class's latency.

`machine_for_run` builds the Machine of a run: ranks per node from the hostnames (all-gathered)
or LOCAL_WORLD_SIZE, the intra-node class from `nvidia-smi topo -m` (or the recipe), the NIC from
`parallel.inter_node_gbps`, and, when the recipe says `auto`, the attention FLOP/s (and on CPU
gloo the link) from a short timing at start-up averaged over all ranks. Rank 0's result is then
broadcast, because every rank must pick the same schedule or the job deadlocks.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import subprocess
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

log = logging.getLogger("longctx")

BACKWARD_FLOPS = 2.5  # FlashAttention-2 backward: 5 matmuls (one recomputes P) to the forward's 2


@dataclass(frozen=True)
class LinkClass:
    """Bytes/s out of and into a rank (pairwise: per peer pair), seconds per message, and the
    share of that rate a ring all-gather reaches (NCCL's ~1; gloo's, hop by hop in the calling
    thread, about half of its send/recv on this box: measured with the link)."""

    name: str
    out_bytes_per_s: float
    in_bytes_per_s: float
    latency: float
    pairwise: bool  # a private link per peer pair (PCIe P2P, NVLink mesh); else one shared port (NVSwitch, NIC)
    all_gather_efficiency: float = 1.0


@dataclass(frozen=True)
class Machine:
    """ranks_per_node consecutive global ranks share a node. flops: sustained attention FLOP/s per
    rank (fwd+bwd); step_overhead: seconds per schedule step (launches, Python, a wait);
    memory_bandwidth: bytes/s for the fp32 merges and layout copies between kernels; overlap:
    share of a transfer that can hide behind compute (1 where DMA engines move the bytes; less on
    CPU gloo, whose copies run on the cores that compute); causal_tile: tokens T of the diagonal a
    causal kernel computes in full, so a causal block of L rows runs its useful FLOPs at
    flops * L / (L + T) (a device default, not measured: every schedule loses about the same to
    it, so it moves the modelled times, not their order; measured on this box: ~560 at L=1024)."""

    ranks_per_node: int
    intra: LinkClass
    inter: LinkClass
    flops: float
    step_overhead: float
    memory_bandwidth: float
    name: str
    overlap: float = 1.0
    causal_tile: float = 0.0


def nic(gbps: float) -> LinkClass:
    """A per-GPU NIC (InfiniBand / RoCE) of `gbps` Gb/s each direction, at the ~90% of line rate
    that NCCL's send/recv reaches."""
    rate = 0.9 * gbps * 1e9 / 8
    return LinkClass(f"ib{gbps:g}", rate, rate, 5e-6, False)


LINKS: dict[str, LinkClass] = {
    # gloo over loopback TCP on this box (4 ranks on 2 cores: ~1.5 GB/s per rank for 4 MB ring
    # exchanges, a few ms per hop under load, sends to every peer at once at about half that
    # rate); runs measure it instead
    "cpu_gloo": LinkClass("cpu_gloo", 1.5e9, 1.5e9, 2e-3, False, all_gather_efficiency=0.5),
    # H100/H200 NVLink4 through NVSwitch: 450 GB/s per direction per GPU, ~370 GB/s reached by NCCL send/recv
    "nvswitch": LinkClass("nvswitch", 370e9, 370e9, 1e-5, False),
    # direct NVLink / Infinity Fabric / HCCS meshes: a link per GPU pair (~50 GB/s each direction)
    "nvlink_mesh": LinkClass("nvlink_mesh", 50e9, 50e9, 1e-5, True),
    # PCIe 4.0 x16 peer-to-peer (~25 GB/s per direction), modelled as a link per pair (TokenRing's
    # PIX/PXB setting); GPUs that share one switch uplink get less
    "pcie": LinkClass("pcie", 25e9, 25e9, 1.5e-5, True),
    **{f"ib{g}": nic(g) for g in (100, 200, 400, 800)},
}
INTRA_LINKS = ("cpu_gloo", "nvswitch", "nvlink_mesh", "pcie")

# per-device defaults where the recipe gives a number instead of `auto`, or nothing is measured
DEVICE_DEFAULTS = {
    "cuda": {"flops": 300e12, "step_overhead": 5e-5, "memory_bandwidth": 2.5e12, "overlap": 1.0, "causal_tile": 128},
    # gloo's transfers progress in background threads while the ranks compute, but on the same
    # cores: about half hides (fitted to bench/sp_attention.py, 4 ranks on this 2-core box)
    "cpu": {"flops": 3e10, "step_overhead": 5e-4, "memory_bandwidth": 5e9, "overlap": 0.5, "causal_tile": 512},
}


def node_of(global_rank: int, machine: Machine) -> int:
    return global_rank // machine.ranks_per_node


def make_machine(link: str = "nvswitch", ranks_per_node: int = 8, inter_gbps: float = 400.0,
                 tflops: float | None = None, device: str | None = None, **fields) -> Machine:
    """A described (not measured) machine, e.g. for `longctx plan`: a preset intra-node class, a
    NIC, and the device defaults (cpu for cpu_gloo, else cuda) unless `tflops` or `fields` say."""
    if link not in INTRA_LINKS:
        raise ValueError(f"link={link!r}: expected one of {', '.join(INTRA_LINKS)}")
    kind = device or ("cpu" if link == "cpu_gloo" else "cuda")
    values = dict(DEVICE_DEFAULTS[kind])
    if tflops is not None:
        values["flops"] = tflops * 1e12
    values.update(fields)
    inter = nic(inter_gbps)
    return Machine(ranks_per_node, LINKS[link], inter, values["flops"], values["step_overhead"],
                   values["memory_bandwidth"], describe(ranks_per_node, LINKS[link], inter, values["flops"]),
                   values["overlap"], values["causal_tile"])


def flops_text(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP/s"


def describe(ranks_per_node: int, intra: LinkClass, inter: LinkClass, flops: float) -> str:
    return (f"{ranks_per_node}/node {intra.name} {intra.out_bytes_per_s / 1e9:.3g} GB/s, "
            f"{inter.name} {inter.out_bytes_per_s / 1e9:.3g} GB/s, {flops_text(flops)}")


# --- time of one transfer phase ---------------------------------------------------------------
def transfer_seconds(flows, machine: Machine, all_gather: bool = False) -> tuple[float, dict]:
    """(seconds, bytes sent per (rank, "intra"|"inter")) of the flows [(src, dst, bytes)] between
    global ranks, all in flight at once; all_gather: a phase that sends to every peer at once or
    a hop of NCCL's ring all-gather (at the links' all_gather_efficiency)."""
    port_out: dict = defaultdict(float)
    port_in: dict = defaultdict(float)
    pair: dict = defaultdict(float)
    sent: dict = defaultdict(float)
    links = {"intra": machine.intra, "inter": machine.inter}
    for src, dst, nbytes in flows:
        if nbytes <= 0 or src == dst:
            continue
        cls = "intra" if node_of(src, machine) == node_of(dst, machine) else "inter"
        sent[src, cls] += nbytes
        if links[cls].pairwise:
            pair[src, dst, cls] += nbytes
        else:
            port_out[src, cls] += nbytes
            port_in[dst, cls] += nbytes
    if not sent:
        return 0.0, {}
    share = {c: link.all_gather_efficiency if all_gather else 1.0 for c, link in links.items()}
    seconds = max([b / (share[c] * links[c].out_bytes_per_s) for (_, c), b in port_out.items()]
                  + [b / (share[c] * links[c].in_bytes_per_s) for (_, c), b in port_in.items()]
                  + [b / (share[c] * min(links[c].out_bytes_per_s, links[c].in_bytes_per_s))
                     for (_, _, c), b in pair.items()])
    seconds += max(links[c].latency for _, c in sent)
    return seconds, dict(sent)


# --- topology detection -----------------------------------------------------------------------
def ranks_per_node_from_hosts(hosts: list) -> int:
    """Ranks per node from every global rank's host: the run length of equal hosts when all runs
    are equal (torchrun numbers a node's ranks consecutively); otherwise the gcd of the run lengths,
    so every block of that many consecutive ranks still lies on one node."""
    runs, start = [], 0
    for i in range(1, len(hosts) + 1):
        if i == len(hosts) or hosts[i] != hosts[start]:
            runs.append(i - start)
            start = i
    return math.gcd(*runs) if runs else 1


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def intra_link_from_topo(text: str) -> str | None:
    """`nvidia-smi topo -m` -> nvswitch when every GPU pair is NV# (NVLink: through NVSwitch, or a
    direct all-pairs mesh, which the matrix cannot tell apart: set parallel.link=nvlink_mesh for
    the latter), pcie when any pair goes over PIX/PXB/PHB/NODE/SYS, None when there is no matrix
    of two or more GPUs. nvidia-smi underlines the header with terminal codes even into a pipe."""
    gpu = re.compile(r"GPU\d+$")
    lines = [_ANSI.sub("", ln).split() for ln in text.splitlines()]
    header = next((ln for ln in lines if len(ln) > 1 and gpu.match(ln[0]) and gpu.match(ln[1])), None)
    if header is None:
        return None
    columns = [i for i, word in enumerate(header) if gpu.match(word)]
    cells = [ln for ln in lines if ln and gpu.match(ln[0]) and ln is not header]
    pairs = [row[1 + i] for row in cells for i in columns if 1 + i < len(row) and row[1 + i] != "X"]
    if not pairs:
        return None
    return "nvswitch" if all(p.startswith("NV") for p in pairs) else "pcie"


def detect_intra_link(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu_gloo"
    text = None
    if shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            text = None
    found = intra_link_from_topo(text or "")
    if found is None:
        log.warning("parallel.link=auto: no `nvidia-smi topo -m` matrix; modelling pcie (set parallel.link)")
        return "pcie"
    return found


def _world_group():
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _collective_device(device: torch.device, group) -> torch.device:
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def ranks_per_node(device: torch.device) -> int:
    """Ranks per node of this run (hostnames over the default group when there is one; collective)."""
    return detect_ranks_per_node(device, _world_group())


def detect_ranks_per_node(device: torch.device, group=None) -> int:
    if group is None or dist.get_world_size(group) == 1:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    mine = torch.tensor([zlib.crc32(socket.gethostname().encode())], dtype=torch.int64,
                        device=_collective_device(device, group))
    hosts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(hosts, mine, group=group)
    return ranks_per_node_from_hosts([int(h.item()) for h in hosts])


# --- calibration --------------------------------------------------------------------------------
CALIBRATION_SHAPE = {"cuda": (4096, 16, 128), "cpu": (1024, 2, 64)}  # tokens, heads, head dim (batch 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, reps: int = 3, group=None) -> float:
    """Median seconds of fn() over `reps` calls after one warm-up call; with a group, its ranks
    start every call together (on a shared CPU they contend as in a step; the median drops a
    disturbed call)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _calibration_block(device: torch.device, dtype: torch.dtype, kernel: str):
    """(FLOPs, fwd+bwd of an unmasked block of S/2 queries x S keys): 2 S^2 H d forward FLOPs."""
    from ..kernels.attention import block_attn, block_attn_bwd

    S, H, d = CALIBRATION_SHAPE["cuda" if device.type == "cuda" else "cpu"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, H, d, generator=g, device=device).to(dtype) for _ in range(4))

    def block(q_rows, dout_rows, causal):
        def run():
            out, lse = block_attn(q_rows, k, v, causal, impl=kernel)
            block_attn_bwd(dout_rows, q_rows, k, v, out, lse, causal, impl=kernel)
        return run

    half = (q[:, S // 2:].contiguous(), dout[:, S // 2:].contiguous())
    return 2 * (1 + BACKWARD_FLOPS) * S * S * H * d, block(*half, False)


def measure_attention_flops(device: torch.device, dtype: torch.dtype, kernel: str = "auto", reps: int = 3,
                            group=None) -> float:
    """FLOP/s of attention forward + backward (kernels.attention) on this rank, on the unmasked
    block a schedule runs (S/2 queries x S keys; backward BACKWARD_FLOPS x forward)."""
    flops, unmasked = _calibration_block(device, dtype, kernel)
    return flops / _timed(unmasked, device, reps, group)


def measure_memory_bandwidth(device: torch.device, group=None) -> float:
    """Bytes/s of the elementwise work between kernels, timed on what dominates it: an in-place
    merge of a partial into fp32 accumulators (kernels.attention.merge_into) of calibration
    size, counted as choose.MERGE_PASSES passes over the output (exp, casts and broadcasts
    included, which a plain copy would not show)."""
    from ..kernels.attention import merge_into
    from .choose import MERGE_PASSES

    S, H, d = CALIBRATION_SHAPE["cuda" if device.type == "cuda" else "cpu"]
    S *= 4 if device.type == "cuda" else 2  # larger than the caches
    g = torch.Generator(device=device).manual_seed(0)
    out, part = (torch.randn(1, S, H, d, generator=g, device=device) for _ in range(2))
    lse, part_lse = (torch.randn(1, H, S, generator=g, device=device) for _ in range(2))
    merge_into(out, lse, part, part_lse)  # the first calls of these ops pay one-off set-up costs
    seconds = _timed(lambda: merge_into(out, lse, part, part_lse), device, 5, group)
    return MERGE_PASSES * out.numel() * 4 / seconds


def measure_link(group, device: torch.device, nbytes: int = 1 << 22) -> tuple[float, float, float]:
    """(bytes/s, latency seconds, all-gather efficiency) of the group's links: a ring exchange
    (every rank sends `nbytes` to rank+1 and receives from rank-1 at once) and a tiny one, then
    `nbytes` to every peer at once as the schedules send it on gloo (p2p.Communicator.to_every_peer:
    all-gather, all-to-all, reduce-scatter) against P-1 such exchanges; the slowest rank's times."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = _collective_device(device, group)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)

    def exchange(numel):
        send, recv = torch.ones(numel, device=dev), torch.empty(numel, device=dev)

        def run():
            ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return run

    def gather(numel):
        from .p2p import Communicator

        pieces, whole = torch.ones(world, numel, device=dev), torch.empty(world, numel, device=dev)
        comm = Communicator(group)  # its own counters: calibration traffic is not the schedules'
        return lambda: comm.to_every_peer(pieces, whole)

    def timed(run, reps):  # a fixed count: every exchange needs its peers, so ranks repeat alike
        run()
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - start) / reps

    times = torch.tensor([timed(exchange(1), 10), timed(exchange(nbytes // 4), 4), timed(gather(nbytes // 4), 3)],
                         dtype=torch.float64, device=dev)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    small, large, gathered = times.tolist()
    return nbytes / max(large - small, 1e-9), small, min(1.0, (world - 1) * large / max(gathered, 1e-9))


def _mean_over(group, device: torch.device, values: list[float]) -> list[float]:
    if group is None or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device, group))
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def _same_on_every_rank(machine: Machine, device: torch.device, group) -> Machine:
    """Rank 0's machine, everywhere (detection may differ per node; a measurement per rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return machine
    i = machine.intra
    values = [machine.ranks_per_node, INTRA_LINKS.index(i.name), i.out_bytes_per_s, i.in_bytes_per_s, i.latency,
              i.all_gather_efficiency, machine.flops, machine.step_overhead, machine.memory_bandwidth, machine.overlap,
              machine.causal_tile]
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device, group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    rpn, link, out_bps, in_bps, lat, gather, flops, overhead, mem, overlap, tile = t.tolist()
    intra = replace(LINKS[INTRA_LINKS[int(link)]], out_bytes_per_s=out_bps, in_bytes_per_s=in_bps, latency=lat,
                    all_gather_efficiency=gather)
    return Machine(int(rpn), intra, machine.inter, flops, overhead, mem,
                   describe(int(rpn), intra, machine.inter, flops), overlap, tile)


def machine_for_run(parallel_recipe, device, dtype: torch.dtype = torch.bfloat16) -> Machine:
    """The run's Machine, identical on every rank. Reads parallel.link (auto | a preset),
    parallel.inter_node_gbps and parallel.attention_tflops (auto | TFLOP/s): link auto is detected;
    attention_tflops auto is measured (a few hundred ms at start-up), and with it the memory
    bandwidth and, on cpu_gloo, the link. Collective over the default group when it is
    initialised, so every rank calls it."""
    device = torch.device(device)
    link = getattr(parallel_recipe, "link", "auto")
    gbps = float(getattr(parallel_recipe, "inter_node_gbps", 400.0))
    tflops = getattr(parallel_recipe, "attention_tflops", "auto")
    kernel = getattr(parallel_recipe, "attention_kernel", "auto")
    if link != "auto" and link not in INTRA_LINKS:
        raise ValueError(f"parallel.link={link!r}: expected auto or one of {', '.join(INTRA_LINKS)}")
    group = _world_group()
    kind = "cuda" if device.type == "cuda" else "cpu"
    defaults = DEVICE_DEFAULTS[kind]
    ranks_per_node = detect_ranks_per_node(device, group)
    intra = LINKS[detect_intra_link(device) if link == "auto" else link]
    flops, memory_bandwidth, tile = float(tflops) * 1e12 if tflops != "auto" else None, defaults["memory_bandwidth"], \
        defaults["causal_tile"]
    if flops is None:
        flops, memory_bandwidth = _mean_over(group, device, [
            measure_attention_flops(device, dtype, kernel, group=group), measure_memory_bandwidth(device, group)])
    # gloo over loopback depends on the box and its load: measured whenever the run calibrates
    if tflops == "auto" and intra.name == "cpu_gloo" and group is not None and dist.get_world_size(group) > 1:
        bandwidth, latency, efficiency = measure_link(group, device)
        intra = replace(intra, out_bytes_per_s=bandwidth, in_bytes_per_s=bandwidth, latency=latency,
                        all_gather_efficiency=efficiency)
    inter = nic(gbps)
    machine = Machine(ranks_per_node, intra, inter, flops, defaults["step_overhead"], memory_bandwidth,
                      describe(ranks_per_node, intra, inter, flops), defaults["overlap"], tile)
    return _same_on_every_rank(machine, device, group)
