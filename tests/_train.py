"""Runs `longctx train` in a subprocess (torchrun for more than one process) for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def train(run_dir: Path, nproc: int, recipe: Path, overrides: list[str], expect_ok: bool = True):
    """The run's metrics records, or (expect_ok=False) the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tail = ["train", str(recipe), "log.wandb=false", f"run.dir={run_dir}", *overrides]
    cmd = [sys.executable, "-m", "longctx", *tail] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "longctx",
        *tail]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not expect_ok:
        return done
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
