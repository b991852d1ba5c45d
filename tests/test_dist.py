"""Data parallelism: real gloo processes against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import _dist
from longctx.parallel.data_parallel import all_reduce_gradients

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _grad_worker(rank, world):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    (model(x[rank::world]).pow(2).sum() / 8).backward()
    all_reduce_gradients(model.parameters(), dist.group.WORLD, bucket_bytes=256)  # forces several buckets
    return [p.grad for p in model.parameters()]


def test_gradient_sum_equals_single_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    (model(x).pow(2).sum() / 8).backward()
    for grads in _dist.run(_grad_worker, 2):
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(TINY), "train.max_steps=3", "log.wandb=false"]
    one = subprocess.run([sys.executable, "-m", "longctx", "train", *args, f"run.dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "longctx", "train", *args, f"run.dir={tmp_path / 'two'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    single, double = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert abs(single[0] - double[0]) <= 1e-6
    assert all(abs(a - b) <= 1e-5 for a, b in zip(single, double))
