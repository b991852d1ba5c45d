"""Sequence-parallel attention schedules on gloo: time and bytes per schedule, and what `auto` picks.

One process per rank (CPU, gloo). For each head configuration every schedule runs forward +
backward on a zigzag-sharded causal sequence (fp32, batch 1); the step time is the slowest
rank's median over repeats, bytes are what each rank sent (counted by parallel.p2p). Prints one
JSON object per (configuration, schedule) and a summary:
  token_ring_vs_ring_time / _link_bytes   MHA: TokenRing over the K/V ring baseline
  auto_vs_best_time                       GQA 9/3 (SmolLM2) and 32/8 (Llama-3-8B): the schedule
                                          `auto` chose over the fastest measured one

  python -m longctx.bench.sp_attention --nproc 4 [--seq-len 4096]
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [  # name, heads_q, heads_kv, head_dim
    ("mha", 8, 8, 64),
    ("gqa_9_3", 9, 3, 64),
    ("gqa_32_8", 32, 8, 128),
]
SCHEDULES = ["ring", "token_ring", "bidir_kv", "ulysses"]


def _worker(rank, world, port, seq_len, repeats, threads, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from longctx.parallel import layout
    from longctx.parallel.attention import SCHEDULE_FUNCTIONS
    from longctx.parallel.p2p import communicator

    rows = []
    for name, hq, hkv, d in CONFIGS:
        g = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(1, seq_len, hq, d, generator=g) for _ in range(2))
        k, v = (torch.randn(1, seq_len, hkv, d, generator=g) for _ in range(2))
        shards = [layout.split(t, rank, world) for t in (q, k, v, dout)]
        for schedule in SCHEDULES:
            if schedule == "ulysses" and hq % world:
                rows.append({"config": name, "schedule": schedule, "skipped": f"Hq={hq} not divisible by {world}"})
                continue
            fn = SCHEDULE_FUNCTIONS[schedule]
            comm = communicator(dist.group.WORLD)
            times = []
            for i in range(repeats + 1):
                ql, kl, vl = (t.clone().requires_grad_() for t in shards[:3])
                dist.barrier()
                comm.reset()
                t0 = time.perf_counter()
                out = fn(ql, kl, vl, dist.group.WORLD)
                out.backward(shards[3])
                seconds = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step lasts as long as its slowest rank
                if i:
                    times.append(seconds.item())
            stats = comm.stats()
            rows.append({"config": name, "schedule": schedule, "fwd_bwd_seconds": statistics.median(times),
                         "bytes_sent_per_rank": stats["bytes_sent"],
                         "max_bytes_per_link_direction": stats["max_bytes_per_link_direction"]})
    queue.put((rank, pickle.dumps(rows)))
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args.seq_len, args.repeats, args.threads, queue))
             for r in range(args.nproc)]
    for proc in procs:
        proc.start()
    per_rank = dict(queue.get(timeout=3600) for _ in procs)
    for proc in procs:
        proc.join()
    from longctx.parallel.choose import LINKS, Shape, choose

    results = {}
    for i, row in enumerate(pickle.loads(per_rank[0])):
        others = [pickle.loads(per_rank[r])[i] for r in range(args.nproc)]
        name = row["config"]
        hq, hkv, d = next(c[1:] for c in CONFIGS if c[0] == name)
        out = {"schedule": row["schedule"], "config": name, "world": args.nproc, "seq_len": args.seq_len,
               "heads_q": hq, "heads_kv": hkv, "head_dim": d, "dtype": "fp32", "machine": platform.machine()}
        if "skipped" in row:
            out["skipped"] = row["skipped"]
        else:
            out.update(fwd_bwd_seconds=round(row["fwd_bwd_seconds"], 4),
                       bytes_sent_per_rank=max(o["bytes_sent_per_rank"] for o in others),
                       max_bytes_per_link_direction=max(o["max_bytes_per_link_direction"] for o in others))
            results[(name, row["schedule"])] = out
        print(json.dumps(out), flush=True)
    summary = {}
    ring, token = results.get(("mha", "ring")), results.get(("mha", "token_ring"))
    if ring and token:
        summary["token_ring_vs_ring_time"] = round(token["fwd_bwd_seconds"] / ring["fwd_bwd_seconds"], 3)
        summary["token_ring_vs_ring_link_bytes"] = round(
            token["max_bytes_per_link_direction"] / ring["max_bytes_per_link_direction"], 3)
    for name, hq, hkv, d in CONFIGS[1:]:
        measured = {s: results[(name, s)]["fwd_bwd_seconds"] for s in SCHEDULES if (name, s) in results}
        picked, why = choose(Shape(args.seq_len, hq, hkv, d, args.nproc, 4), LINKS["cpu_gloo"])
        summary[f"auto_vs_best_time_{name}"] = round(measured[picked] / min(measured.values()), 3)
        summary[f"auto_choice_{name}"] = picked
        summary[f"best_{name}"] = min(measured, key=measured.get)
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
