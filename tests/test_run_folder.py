"""Run folders that cannot be mixed up (issue 16, item 3): a fresh run never writes into an earlier
run's folder unless asked, pruning keeps this run's newest checkpoints and never the one just
written, a final checkpoint is always saved, metrics.jsonl holds each step once across a resume,
and a crash at any point inside a save leaves the previous checkpoint for `resume: auto`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from longctx.cli import main
from longctx.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
COMMON = ["log.wandb=false", "train.warmup_steps=0"]


def _train(run_dir: Path, *overrides) -> int:
    return main(["train", str(TINY), f"run.dir={run_dir}", *COMMON, *overrides])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=1") == 0
    before = _snapshot(run_dir)
    assert _train(run_dir, "train.max_steps=2", "train.keep_last=1") == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (checkpoints/, metrics.jsonl, run.json)" in err and "run.overwrite=true" in err
    assert _snapshot(run_dir) == before  # nothing written, nothing pruned
    assert _train(run_dir, "train.max_steps=2", "train.keep_last=1", "run.overwrite=true") == 0
    assert [p.name for p in ckpt.step_folders(run_dir / "checkpoints")] == ["step-2"]
    assert _steps(run_dir) == [1, 2]


def test_checkpoint_every_zero_still_writes_the_final_checkpoint(tmp_path):
    assert _train(tmp_path / "run", "train.max_steps=2") == 0
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-2"]


def test_pruning_keeps_this_runs_newest_and_never_touches_another_runs(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=3") == 0
    root = run_dir / "checkpoints"
    foreign = root / "step-9"  # another run's checkpoint, copied in by hand
    shutil.copytree(root / "step-1", foreign)
    state = json.loads((foreign / ckpt.STATE).read_text())
    (foreign / ckpt.STATE).write_text(json.dumps({**state, "step": 9, "run_id": "someone-else"}))
    ckpt._write_manifest(foreign)
    # resume: auto takes this run's newest, not the foreign step-9, and pruning keeps step-9
    assert _train(run_dir, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=1",
                  "train.resume=auto") == 0
    assert [p.name for p in ckpt.step_folders(root)] == ["step-4", "step-9"]
    assert _steps(run_dir) == [1, 2, 3, 4]


def test_metrics_hold_each_step_once_after_resuming_from_an_older_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=3", "train.checkpoint_every=2") == 0
    shutil.rmtree(run_dir / "checkpoints" / "step-3")  # resume from step 2: step 3 is redone
    assert _train(run_dir, "train.max_steps=5", "train.checkpoint_every=2", "train.resume=auto") == 0
    assert _steps(run_dir) == [1, 2, 3, 4, 5]
    run_ids = {json.loads((p / ckpt.STATE).read_text())["run_id"] for p in ckpt.step_folders(run_dir / "checkpoints")}
    assert run_ids == {json.loads((run_dir / "run.json").read_text())["run_id"]}


@pytest.mark.parametrize("point, survivor", [("dcp", "step-2"), ("manifest", "step-2"), ("rename", "step-3"),
                                             ("prune", "step-3")])
def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_for_auto_resume(tmp_path, point, survivor):
    """SIGKILL at a chosen point of step 3's save (a test hook inside checkpoint.save)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "longctx", "train", str(TINY), f"run.dir={run_dir}", *COMMON, "train.max_steps=4",
           "train.checkpoint_every=1", "train.keep_last=1"]
    env = {**os.environ, "LONGCTX_KILL_DURING_SAVE": f"{point}:step-3"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert ckpt.newest_valid(run_dir / "checkpoints").name == survivor
    env.pop("LONGCTX_KILL_DURING_SAVE")
    done = subprocess.run([*cmd, "train.resume=auto"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / survivor}" in done.stderr
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert [p.name for p in ckpt.step_folders(run_dir / "checkpoints")] == ["step-4"]


def test_resume_applies_a_changed_learning_rate_and_says_so(tmp_path, caplog):
    """Issue 16: resume restored the checkpoint's lr while recipe.yaml said the new one."""
    from longctx.train.optim import lr_at

    caplog.set_level("WARNING", logger="longctx")
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=2", "train.lr=3e-3") == 0
    assert _train(run_dir, "train.max_steps=4", "train.lr=1e-3", "train.beta2=0.9", "train.resume=auto") == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    min_ratio = 0.1
    for r in records[2:]:
        assert r["lr"] == pytest.approx(1e-3 * lr_at(r["step"] - 1, 4, 0, min_ratio)), r
    assert "train.lr 0.003 -> 0.001" in caplog.text and "train.beta2 0.95 -> 0.9" in caplog.text
    assert "train.max_steps 2 -> 4" in caplog.text
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "lr: 0.001" in recipe and "beta2: 0.9" in recipe


def test_resuming_another_runs_checkpoint_into_a_used_folder_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "train.max_steps=1") == 0
    assert _train(b, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=3") == 0
    before = _snapshot(b)
    assert _train(b, "train.max_steps=2", f"train.resume={a / 'checkpoints' / 'step-1'}", "train.keep_last=1") == 2
    assert "is not a checkpoint of that run" in capsys.readouterr().err
    assert _snapshot(b) == before


def test_run_overwrite_deletes_nothing_when_the_run_fails_to_build(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=2") == 0
    before = _snapshot(run_dir)
    assert _train(run_dir, "run.overwrite=true", f"data.source={tmp_path / 'typo.jsonl'}") == 2
    assert _snapshot(run_dir) == before


def test_an_explicit_rewind_sets_the_abandoned_branch_aside(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=3") == 0
    root = run_dir / "checkpoints"
    assert _train(run_dir, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_last=3",
                  f"train.resume={root / 'step-1'}") == 0
    names = sorted(p.name for p in root.iterdir())
    assert [n for n in names if n.startswith("step-") and "." not in n] == ["step-1", "step-2"]
    assert any(n.startswith("step-3.abandoned-") for n in names), names  # kept, but never resumed from
    assert ckpt.newest_valid(root).name == "step-2" and _steps(run_dir) == [1, 2]
