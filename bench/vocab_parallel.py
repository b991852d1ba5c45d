"""Vocabulary parallelism on gloo: per-rank memory of the vocabulary layers, and step time of the
gather and stream variants against the replicated head, with the byte model's prediction.

One run, 4 ranks (one process each, gloo), V = 49152 (SmolLM2) and 128256 (Llama 3) with the
hidden size scaled down. A "step" is what the vocabulary layers cost in a training step: the
embedding lookup of this rank's ids, the loss head (Cut Cross-Entropy over this rank's tokens,
untied weights, fp32), their backward, the gradient reduction the layout needs (replicated: an
all-reduce of both V x D gradients over the group; vocab-parallel: none) and AdamW's step.
  replicated  every rank holds both V x D weights (kernels/cce_torch.py head, nn.Embedding)
  gather / stream  parallel/vocab.py, rows [r*c, (r+1)*c) on rank r
Memory: each rank's peak resident bytes over two steps (AdamW's states exist from the first)
minus its bytes before the weights were made: weights + gradients + optimizer states + the
layers' transients (glibc's mmap threshold lowered so freed tensors leave the resident set;
the peak is reset between cases through /proc/self/clear_refs). Time: the slowest rank's best of
`--repeats` steps. Prediction: parallel.vocab.predict_seconds with this machine's compute rate
and link speed measured in the same run (all ranks busy at once), as `auto` would use them;
the replicated head is modelled as its compute plus the ring all-reduce of 2 x V x D fp32.

Prints one JSON object per case and a last line {"summary": {...}}:
  head_memory_ratio_v<V>   vocab-parallel peak / replicated peak, per rank (the larger variant's)
  auto_vs_best_time        max over (V, tokens) of the measured time of auto's pick over the
                           faster of gather and stream
  python -m longctx.bench.vocab_parallel [--nproc 4] [--hidden 32] [--memory-hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCABS = (49152, 128256)
TOKENS = (4096, 65536)  # the group's tokens per step (each rank holds 1/P)
MODES = ("replicated", "gather", "stream")


def _rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


class _Layers:
    """The embedding + loss head of one mode on this rank, with an AdamW over their weights."""

    def __init__(self, mode, vocab_size, hidden, group, seed=0):
        from longctx.parallel import vocab

        g = torch.Generator().manual_seed(seed)
        self.mode, self.group = mode, group
        full = lambda: torch.randn(vocab_size, hidden, generator=g) * 0.02  # noqa: E731
        self.shard = vocab.VocabShard.of(vocab_size, group)
        if mode == "replicated":
            self.emb, self.head = full().requires_grad_(), full().requires_grad_()
        else:
            self.emb = vocab.shard_rows(full(), self.shard).requires_grad_()
            self.head = vocab.shard_rows(full(), self.shard).requires_grad_()
        self.opt = torch.optim.AdamW([self.emb, self.head], lr=1e-4, foreach=True)

    def step(self, ids, labels):
        from longctx.kernels.cce_torch import linear_cross_entropy
        from longctx.parallel import vocab
        from longctx.parallel.data_parallel import all_reduce_gradients

        if self.mode == "replicated":
            x = torch.nn.functional.embedding(ids, self.emb)
            loss = linear_cross_entropy(x, self.head, labels, reduction="sum")
            loss.backward()
            all_reduce_gradients([self.emb, self.head], self.group)
        else:
            x = vocab.embedding(ids, self.emb, self.shard, self.mode)
            loss = vocab.linear_cross_entropy(x, self.head, labels, self.shard, self.mode)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def _inputs(tokens, vocab_size, rank, seed=1):
    g = torch.Generator().manual_seed(seed + rank)
    return torch.randint(0, vocab_size, (tokens,), generator=g), torch.randint(0, vocab_size, (tokens,), generator=g)


def _calibrate(comm, hidden):
    """(flops_per_s, link_bytes_per_s, latency_s) with every rank busy at once, as a step sees them."""
    a, b = torch.randn(2048, hidden), torch.randn(hidden, 8192)
    a @ b
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    flops = 10 * 2 * 2048 * hidden * 8192 / (time.perf_counter() - t0)
    x, y = torch.randn(1 << 21), torch.empty(1 << 21)  # 8 MiB to the next rank while the previous sends to us
    comm.exchange([(x, comm.next)], [(y, comm.prev)]).wait()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(5):
        comm.exchange([(x, comm.next)], [(y, comm.prev)]).wait()
    link = 5 * x.numel() * 4 / (time.perf_counter() - t0)
    small, small_in = torch.zeros(1), torch.zeros(1)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(50):
        comm.exchange([(small, comm.next)], [(small_in, comm.prev)]).wait()
    latency = (time.perf_counter() - t0) / 50
    stats = torch.tensor([flops, link, latency], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MIN)  # the same figures on every rank, as a run shares them
    return float(stats[0]), float(stats[1]), float(stats[2])


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from longctx.parallel import p2p

        group = p2p.new_group(list(range(world)))
        comm = p2p.communicator(group)
        out = {"memory": [], "time": []}
        for mode in MODES:  # first calls load libraries and warm allocators: not a layer's bytes
            ids, labels = _inputs(64, 1031, rank)
            _Layers(mode, 1031, 16, group).step(ids, labels)
        for V in args.vocabs:  # memory: large hidden, few tokens
            for mode in MODES:
                ids, labels = _inputs(args.memory_tokens // world, V, rank)
                dist.barrier()
                base = _rss("VmRSS")
                _reset_peak()
                layers = _Layers(mode, V, args.memory_hidden, group)
                for _ in range(2):
                    layers.step(ids, labels)
                peak = _rss("VmHWM") - base
                del layers
                out["memory"].append({"vocab": V, "mode": mode, "peak_bytes": peak})
        flops, link, latency = _calibrate(comm, args.hidden)
        out["calibration"] = {"flops_per_s": flops, "link_bytes_per_s": link, "latency_s": latency}
        for V in args.vocabs:
            for tokens in args.tokens:
                ids, labels = _inputs(tokens // world, V, rank)
                for mode in MODES:
                    layers = _Layers(mode, V, args.hidden, group)
                    layers.step(ids[:256], labels[:256])  # warm-up (allocations, AdamW's states)
                    best, sent = float("inf"), 0
                    for _ in range(args.repeats):
                        dist.barrier()
                        comm.reset()
                        t0 = time.perf_counter()
                        loss = layers.step(ids, labels)
                        seconds = torch.tensor([time.perf_counter() - t0])
                        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's
                        best, sent = min(best, seconds.item()), comm.stats()["bytes_sent"]
                    del layers
                    out["time"].append({"vocab": V, "tokens": tokens, "mode": mode, "seconds": best,
                                        "bytes_sent": sent, "loss": loss})
        queue.put((rank, pickle.dumps(out), None))
    except Exception:
        import traceback

        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _predict(mode, V, tokens, world, hidden, cal):
    from longctx.parallel import vocab

    n = tokens // world
    if mode == "replicated":
        allreduce = 2 * (world - 1) / world * 2 * V * hidden * 4
        return 8.0 * n * V * hidden / cal["flops_per_s"] + allreduce / cal["link_bytes_per_s"]
    return vocab.predict_seconds(mode, n, V, hidden, world, cal["flops_per_s"], cal["link_bytes_per_s"],
                                 latency_s=cal["latency_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32, help="hidden size of the timed cases")
    ap.add_argument("--memory-hidden", type=int, default=512, help="hidden size of the memory cases")
    ap.add_argument("--memory-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="the group's tokens per timed step")
    args = ap.parse_args(argv)
    from longctx.parallel import vocab

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the resident set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args, queue)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, value, error = queue.get(timeout=7200)
        if error:
            for p in procs:
                p.kill()
            raise SystemExit(f"rank {rank} failed:\n{error}")
        results[rank] = pickle.loads(value)
    for p in procs:
        p.join(timeout=60)
    machine = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "ranks": args.nproc, "backend": "gloo", "measured": True}
    summary = {}
    for V in args.vocabs:
        peaks = {m: max(results[r]["memory"][i]["peak_bytes"] for r in results for i, row in
                        enumerate(results[r]["memory"]) if row["vocab"] == V and row["mode"] == m) for m in MODES}
        for m in MODES:
            print(json.dumps({"case": "memory", "vocab": V, "hidden": args.memory_hidden, "mode": m,
                              "tokens": args.memory_tokens, "peak_bytes_per_rank": peaks[m],
                              "weights_bytes_replicated": 2 * V * args.memory_hidden * 4, "machine": machine}))
        summary[f"head_memory_ratio_v{V}"] = round(max(peaks["gather"], peaks["stream"]) / peaks["replicated"], 3)
    cal = results[0]["calibration"]
    worst = 0.0
    for V in args.vocabs:
        for tokens in args.tokens:
            rows = {row["mode"]: row for row in results[0]["time"] if row["vocab"] == V and row["tokens"] == tokens}
            pick = vocab.choose(tokens // args.nproc, V, args.hidden, args.nproc, cal["flops_per_s"],
                                cal["link_bytes_per_s"], latency_s=cal["latency_s"])
            for m in MODES:
                r = rows[m]
                print(json.dumps({"case": "time", "vocab": V, "hidden": args.hidden, "tokens": tokens, "mode": m,
                                  "seconds": round(r["seconds"], 4),
                                  "predicted_seconds": round(_predict(m, V, tokens, args.nproc, args.hidden, cal), 4),
                                  "bytes_sent_per_rank": r["bytes_sent"],
                                  "predicted_bytes_per_rank": 0 if m == "replicated" else sum(
                                      vocab.bytes_per_rank(m, layer, tokens // args.nproc, V, args.hidden, args.nproc)
                                      for layer in ("head", "embedding")),
                                  "loss": round(r["loss"], 4), "auto_picks": pick, "machine": machine}))
            best = min(rows["gather"]["seconds"], rows["stream"]["seconds"])
            ratio = rows[pick]["seconds"] / best
            summary[f"auto_vs_best_time_v{V}_t{tokens}"] = round(ratio, 3)
            summary[f"stream_vs_replicated_time_v{V}_t{tokens}"] = round(
                rows["stream"]["seconds"] / rows["replicated"]["seconds"], 3)
            summary[f"gather_vs_replicated_time_v{V}_t{tokens}"] = round(
                rows["gather"]["seconds"] / rows["replicated"]["seconds"], 3)
            worst = max(worst, ratio)
    summary["auto_vs_best_time"] = round(worst, 3)
    summary["calibration"] = {k: float(f"{v:.4g}") for k, v in cal.items()}
    summary["targets"] = {"head_memory_ratio <= 0.3": all(summary[f"head_memory_ratio_v{V}"] <= 0.3 for V in args.vocabs),
                          "auto_vs_best_time <= 1.05": worst <= 1.05}
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
