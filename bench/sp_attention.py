"""Sequence-parallel attention schedules on gloo: measured and modelled time, bytes, and what
`auto` picks.

One process per rank (CPU, gloo). For each head configuration every schedule runs forward +
backward on a zigzag-sharded causal sequence (fp32, batch 1); the step time is the slowest
rank's median over repeats, bytes are what each rank sent (counted by parallel.p2p). Beside each
measurement stands the chooser's modelled time (parallel/choose.py) for a machine calibrated the
way a run calibrates it (parallel/topology.py `machine_for_run`, attention_tflops auto). Hybrid
runs Ulysses over pairs of ranks and each outer schedule over the pairs.

Prints one JSON object per (configuration, schedule) and a last line {"summary": {...}}:
  token_ring_vs_ring_time / _link_bytes   MHA: TokenRing over the K/V ring, time and bytes on the
                                          busiest link direction of a full mesh (pair links)
  auto_vs_best_time_<config>              the measured time of the schedule `auto` picks over the
                                          fastest measured one
  ranking_agrees_<config>                 whether every pair of schedules whose measured times
                                          differ by more than 10% is ordered the same by the model

  python bench/sp_attention.py --nproc 4 [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import time
from queue import Empty
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [  # name, heads_q, heads_kv, head_dim
    ("mha", 8, 8, 64),
    ("gqa_9_3", 9, 3, 64),
    ("gqa_32_8", 32, 8, 128),
]
FLAT = ["ring", "token_ring", "bidir_kv", "allgather_kv", "ulysses"]
OUTER = ["ring", "token_ring", "bidir_kv", "allgather_kv"]


def _variants(world: int, inner: int) -> list[str]:
    hybrid = [f"hybrid/{o}" for o in OUTER] if 1 < inner < world and world % inner == 0 else []
    return FLAT + hybrid


def _impossible(variant: str, hq: int, world: int, inner: int) -> str | None:
    if variant == "ulysses" and hq % world:
        return f"Hq={hq} not divisible by sp={world}"
    if variant.startswith("hybrid") and hq % inner:
        return f"Hq={hq} not divisible by sp_inner={inner}"
    return None


def _worker(rank, world, port, seq_len, repeats, threads, inner, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, pickle.dumps(_measure(rank, world, seq_len, repeats, inner))))
    finally:
        dist.destroy_process_group()


def _measure(rank, world, seq_len, repeats, inner):
    from longctx.parallel import layout, topology
    from longctx.parallel.attention import SCHEDULE_FUNCTIONS
    from longctx.parallel.hybrid import HybridGroup, make_groups
    from longctx.parallel.p2p import communicator

    hybrid_group = make_groups(list(range(world)), inner) if 1 < inner < world and world % inner == 0 else None
    recipe = SimpleNamespace(link="cpu_gloo", inter_node_gbps=400.0, attention_tflops="auto", sp_inner=inner)
    machine = topology.machine_for_run(recipe, torch.device("cpu"), torch.float32)

    rows = []
    for name, hq, hkv, d in CONFIGS:
        g = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(1, seq_len, hq, d, generator=g) for _ in range(2))
        k, v = (torch.randn(1, seq_len, hkv, d, generator=g) for _ in range(2))
        shards = [layout.split(t, rank, world).contiguous() for t in (q, k, v, dout)]
        for variant in _variants(world, inner):
            why = _impossible(variant, hq, world, inner)
            if why:
                rows.append({"config": name, "schedule": variant, "skipped": why})
                continue
            if variant.startswith("hybrid/"):
                fn = SCHEDULE_FUNCTIONS["hybrid"]
                group = HybridGroup(hybrid_group.inner, hybrid_group.outer, variant.split("/")[1])
                comms = [communicator(hybrid_group.inner), communicator(hybrid_group.outer)]
            else:
                fn, group = SCHEDULE_FUNCTIONS[variant], dist.group.WORLD
                comms = [communicator(group)]
            times = []
            for i in range(repeats + 1):
                ql, kl, vl = (t.clone().requires_grad_() for t in shards[:3])
                dist.barrier()
                for c in comms:
                    c.reset()
                t0 = time.perf_counter()
                out = fn(ql, kl, vl, group)
                out.backward(shards[3])
                seconds = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step lasts as long as its slowest rank
                if i:
                    times.append(seconds.item())
            sent = sum(c.stats()["bytes_sent"] for c in comms)
            pair = max(c.stats()["max_bytes_per_pair_direction"] for c in comms)
            rows.append({"config": name, "schedule": variant, "fwd_bwd_seconds": statistics.median(times),
                         "bytes_sent_per_rank": sent, "max_bytes_per_pair_direction": pair})
    return rows, machine


def _model(variant: str, shape, machine, inner: int) -> float:
    from longctx.parallel.choose import estimate

    if variant.startswith("hybrid/"):
        return estimate("hybrid", shape, machine, sp_inner=inner, outer=variant.split("/")[1])["seconds"]
    return estimate(variant, shape, machine)["seconds"]


def _ranking_agrees(measured: dict, modelled: dict, margin: float = 0.10) -> tuple[bool, list]:
    wrong = []
    names = sorted(measured)
    for a in names:
        for b in names:
            if measured[a] * (1 + margin) < measured[b] and not modelled[a] < modelled[b]:
                wrong.append(f"{a} < {b}")
    return not wrong, wrong


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per schedule (median; one more warms up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--sp-inner", type=int, default=2, help="hybrid: Ulysses degree (1 = no hybrid)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args.seq_len, args.repeats, args.threads,
                                               args.sp_inner, queue))
             for r in range(args.nproc)]
    for proc in procs:
        proc.start()
    per_rank = {}
    while len(per_rank) < len(procs):
        try:
            rank, payload = queue.get(timeout=10)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:  # a rank died (its traceback is above): the others wait on it forever
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank exited with status {dead[0]}") from None
            continue
        per_rank[rank] = pickle.loads(payload)
    for proc in procs:
        proc.join()
    from longctx.parallel.choose import Shape, choose

    machine = per_rank[0][1]
    print(json.dumps({"machine": {"flops": machine.flops, "intra": machine.intra.name,
                                  "intra_out_bytes_per_s": machine.intra.out_bytes_per_s,
                                  "latency": machine.intra.latency, "step_overhead": machine.step_overhead,
                                  "memory_bandwidth": machine.memory_bandwidth}}), flush=True)
    results = {}
    for i, row in enumerate(per_rank[0][0]):
        others = [per_rank[r][0][i] for r in range(args.nproc)]
        name = row["config"]
        hq, hkv, d = next(c[1:] for c in CONFIGS if c[0] == name)
        shape = Shape(args.seq_len, hq, hkv, d, args.nproc, 4)
        out = {"schedule": row["schedule"], "config": name, "world": args.nproc, "seq_len": args.seq_len,
               "heads_q": hq, "heads_kv": hkv, "head_dim": d, "dtype": "fp32", "machine": platform.machine()}
        if "skipped" in row:
            out["skipped"] = row["skipped"]
        else:
            out.update(fwd_bwd_seconds=round(row["fwd_bwd_seconds"], 4),
                       modelled_seconds=round(_model(row["schedule"], shape, machine, args.sp_inner), 4),
                       bytes_sent_per_rank=max(o["bytes_sent_per_rank"] for o in others),
                       max_bytes_per_pair_direction=max(o["max_bytes_per_pair_direction"] for o in others))
            results[(name, row["schedule"])] = out
        print(json.dumps(out), flush=True)
    summary = {}
    ring, token = results.get(("mha", "ring")), results.get(("mha", "token_ring"))
    if ring and token:
        summary["token_ring_vs_ring_time"] = round(token["fwd_bwd_seconds"] / ring["fwd_bwd_seconds"], 3)
        summary["token_ring_vs_ring_link_bytes"] = round(
            token["max_bytes_per_pair_direction"] / ring["max_bytes_per_pair_direction"], 3)
    for name, hq, hkv, d in CONFIGS:
        measured = {s: r["fwd_bwd_seconds"] for (c, s), r in results.items() if c == name}
        modelled = {s: r["modelled_seconds"] for (c, s), r in results.items() if c == name}
        picked = choose(Shape(args.seq_len, hq, hkv, d, args.nproc, 4), machine,
                        sp_inner=args.sp_inner if args.sp_inner > 1 else None)
        variant = f"hybrid/{picked.outer}" if picked.name == "hybrid" else picked.name
        summary[f"auto_vs_best_time_{name}"] = round(measured[variant] / min(measured.values()), 3)
        summary[f"auto_choice_{name}"] = variant
        summary[f"best_{name}"] = min(measured, key=measured.get)
        agrees, wrong = _ranking_agrees(measured, modelled)
        summary[f"ranking_agrees_{name}"] = agrees
        if wrong:
            summary[f"ranking_disagrees_{name}"] = wrong
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
