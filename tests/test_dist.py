"""Data parallelism: real gloo processes against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist
import pytest
import torch
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


def _torchrun(tmp_path, name, nproc, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "longctx", "train", str(TINY), "log.wandb=false", f"run.dir={tmp_path / name}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "longctx", "train", str(TINY), "log.wandb=false", f"run.dir={tmp_path / name}",
               *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


SP_COMMON = ["train.max_steps=3", "data.source=default:chapters", "data.max_documents=80", "data.min_len=32",
             "data.curriculum=weights", "data.curriculum_weights={32: 20, 64: 20, 128: 1}"]


def test_sequence_parallel_losses_equal_one_process(tmp_path):
    """sp=2 (one sp group) gives the same per-step losses as one process, for every schedule;
    the weights make short buckets likely, which run at a smaller sp degree."""
    single = _torchrun(tmp_path, "single", 1, *SP_COMMON)
    for schedule in ("ring", "token_ring", "bidir_kv", "ulysses"):
        sp = _torchrun(tmp_path, schedule, 2, *SP_COMMON, "parallel.sp_degree=2", f"parallel.attention={schedule}",
                       "parallel.min_tokens_per_sp_rank=32")
        assert [r["loss"] for r in sp] == pytest.approx([r["loss"] for r in single], abs=1e-5), schedule
        assert any(r["sp_degree"] == 2 for r in sp) and all(r["attention"] in (schedule, "local") for r in sp)


@pytest.mark.slow
def test_sequence_parallel_four_ranks_with_data_parallel(tmp_path):
    single = _torchrun(tmp_path, "single", 1, *SP_COMMON)
    for overrides in (["parallel.sp_degree=4", "parallel.attention=token_ring"],
                      ["parallel.sp_degree=2", "parallel.attention=auto"]):  # dp=2 x sp=2
        sp = _torchrun(tmp_path, "x".join(overrides), 4, *SP_COMMON, *overrides, "parallel.min_tokens_per_sp_rank=16")
        assert [r["loss"] for r in sp] == pytest.approx([r["loss"] for r in single], abs=1e-5), overrides
