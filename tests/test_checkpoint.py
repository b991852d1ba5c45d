"""Sharding and durability, end to end through `longctx train` processes: FSDP2 equals replicated
data parallelism; SIGKILL then `resume: auto` continues bitwise (1 and 2 processes, dataset
decomposition on); SIGTERM saves and stops; export from a 2-rank FSDP2 checkpoint; resharding to
another world size; a dead rank is named within the timeout; DeepSpeed ZeRO-3 where installed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dist import free_port

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
BASE = ["log.wandb=false", "log.every=1"]


def _cmd(nproc: int, run_dir: Path, *overrides) -> list[str]:
    args = ["-m", "longctx", "train", str(TINY), *BASE, f"run.dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _train(nproc: int, run_dir: Path, *overrides, expect: int = 0) -> list[dict]:
    done = subprocess.run(_cmd(nproc, run_dir, *overrides), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return _losses(run_dir)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while max(_losses(run_dir), default=0) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-2000:]}"
        assert time.time() < end, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def test_fsdp2_losses_equal_replicated_data_parallel(tmp_path):
    common = ["train.max_steps=3", "memory.policy=memo", "memory.alpha=0.5"]
    replicated = _train(2, tmp_path / "none", *common)
    sharded = _train(2, tmp_path / "fsdp2", *common, "parallel.sharding=fsdp2")
    assert sorted(sharded) == [1, 2, 3]
    assert all(abs(sharded[s] - replicated[s]) <= 1e-5 for s in replicated), (replicated, sharded)


@pytest.mark.parametrize("nproc,sharding", [(1, "none"), (2, "fsdp2")])
def test_sigkill_then_resume_auto_is_bitwise(tmp_path, nproc, sharding):
    """Killed (SIGKILL, the whole process group) after step 3 of 12, possibly mid-save; the resumed
    run's losses from the checkpoint on equal the uninterrupted run's exactly (data order included)."""
    common = ["train.max_steps=12", "train.checkpoint_every=1", "train.keep_last=2", f"parallel.sharding={sharding}"]
    full = _train(nproc, tmp_path / "full", *common)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(nproc, run_dir, *common), env=_env(), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(proc, run_dir, 3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    last_seen = json.loads(before[-1])["step"]
    assert last_seen < 12, "the run finished before it was killed"
    _train(nproc, run_dir, *common, "train.resume=auto")
    # metrics.jsonl is one run's: the steps redone after the checkpoint are not repeated
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {r["step"]: r["loss"] for r in records} == full, (full, records)


def test_sigterm_saves_then_stops_and_resume_continues(tmp_path):
    common = ["train.max_steps=400"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(1, run_dir, *common), env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stopped_at = max(_losses(run_dir))
    assert stopped_at < 400 and (run_dir / "checkpoints" / f"step-{stopped_at}" / "manifest.json").is_file()
    resumed = _train(1, run_dir, "train.max_steps=400", f"train.max_steps={stopped_at + 2}", "train.resume=auto")
    assert sorted(resumed)[-2:] == [stopped_at + 1, stopped_at + 2]


def test_export_from_two_rank_fsdp2_checkpoint_and_reshard_to_one_process(tmp_path):
    from longctx.cli import main
    from longctx.kernels.attention import local_attention
    from longctx.models.config import load_hf_config
    from longctx.models.hf import load_weights, read_state_dict
    from longctx.models.llama import CausalLM
    from transformers import AutoModelForCausalLM

    common = ["train.max_steps=2", "train.checkpoint_every=2", "train.export=true"]
    assert sorted(_train(2, tmp_path / "fsdp", *common, "parallel.sharding=fsdp2")) == [1, 2]
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-2"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0  # this process: one rank, no process group
    exported, live = read_state_dict(tmp_path / "hf"), read_state_dict(tmp_path / "fsdp" / "export")
    assert exported.keys() == live.keys() and all(torch.equal(exported[k], live[k]) for k in live)
    cfg = load_hf_config(tmp_path / "hf")
    ours = CausalLM(cfg, attention=local_attention, loss=None)
    load_weights(ours, tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        ref = ours.logits(ids)
        got = hf(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the same checkpoint resumed by one unsharded process (resharded on load) continues the run
    full = _train(2, tmp_path / "full", "train.max_steps=4", "parallel.sharding=fsdp2")
    one = _train(1, tmp_path / "one", "train.max_steps=4", f"train.resume={ckpt}")
    assert sorted(one) == [3, 4]
    assert all(abs(one[s] - full[s]) <= 1e-5 for s in one), (full, one)


def test_dead_rank_is_named_within_the_timeout(tmp_path):
    """Two `longctx train` processes rendezvous without torchrun; rank 1 is SIGKILLed after step 2:
    rank 0 must exit with an error naming rank 1 well within parallel.timeout_seconds."""
    port = str(free_port())
    run_dir = tmp_path / "run"
    procs = []
    for rank in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(_cmd(1, run_dir, "train.max_steps=100000", "parallel.timeout_seconds=60"),
                                      env=env, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_step(procs[0], run_dir, 2)
        procs[1].kill()
        t0 = time.time()
        code = procs[0].wait(timeout=90)
        elapsed = time.time() - t0
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert code == 1, err[-2000:]
    assert "rank 1 stopped responding" in err, err[-2000:]
    assert elapsed < 60


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="DeepSpeed not installed")
def test_deepspeed_zero3_losses_equal_replicated_data_parallel(tmp_path):
    common = ["train.max_steps=3"]
    replicated = _train(2, tmp_path / "none", *common)
    zero3 = _train(2, tmp_path / "ds", *common, "parallel.sharding=deepspeed", "parallel.zero_stage=3")
    assert all(abs(zero3[s] - replicated[s]) <= 1e-5 for s in replicated), (replicated, zero3)
