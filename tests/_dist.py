"""Spawns gloo worker processes for distributed tests (free port, never a fixed one)."""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # one compute thread per rank: `world` processes share the CI box's 2 cores, and more threads
    # than cores slow every collective's slowest rank (a 4-rank test ran 6x longer at 2 threads each)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # plain pickle copies tensors into bytes: torch's queue pickler would share them through
        # file descriptors that die with this process before the parent reads them
        queue.put((rank, pickle.dumps(fn(rank, world, *args)), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world: int, *args) -> list:
    """Runs fn(rank, world, *args) in `world` gloo processes; returns each rank's result in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict()
    for _ in range(world):
        rank, value, error = queue.get(timeout=300)
        if error:
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} failed:\n{error}")
        results[rank] = pickle.loads(value)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(world)]
