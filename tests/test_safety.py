"""Nothing lost, nothing executed (issue 16, items 1-2): export and convert never delete what they
did not write, and a checkpoint's files never run code, even with a re-hashed manifest."""

import os
import pickle
from pathlib import Path

import pytest
from longctx.cli import main
from longctx.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "run"
    assert main(["train", str(TINY), f"run.dir={folder}", "train.max_steps=1", "train.warmup_steps=0", "train.checkpoint_every=1",
                 "log.wandb=false"]) == 0
    return folder


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(args, capsys) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def test_export_refuses_a_non_empty_folder_and_keeps_it(run_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, err = _export([run_dir / "checkpoints" / "step-1", notes], capsys)
    assert code == 2 and "exists and is not empty" in err and "--force" in err and "Traceback" not in err
    assert (notes / "todo.txt").read_text() == "mine" and len(list(notes.iterdir())) == 1
    assert not list(tmp_path.glob(".notes.*"))


@pytest.mark.parametrize("target", ["run", "checkpoint", "checkpoints", "parent", "inside_checkpoint",
                                    "inside_run"])
def test_export_never_replaces_its_source_even_with_force(run_dir, capsys, target):
    before = _snapshot(run_dir)
    step = run_dir / "checkpoints" / "step-1"
    out = {"run": run_dir, "checkpoint": step, "checkpoints": step.parent, "parent": run_dir.parent,
           "inside_checkpoint": step / "dcp", "inside_run": run_dir / "checkpoints"}[target]
    code, err = _export([step, out, "--force"], capsys)
    assert code == 2 and ("would delete" in err or "would change or delete" in err), err
    assert _snapshot(run_dir) == before


def test_export_into_a_new_folder_inside_the_run_folder_is_fine_but_not_over_its_files(run_dir, capsys):
    code, _ = _export([run_dir / "checkpoints" / "step-1", run_dir / "hf-step-1"], capsys)
    assert code == 0 and (run_dir / "hf-step-1" / "config.json").is_file()
    (run_dir / "wandb").mkdir(exist_ok=True)
    (run_dir / "wandb" / "log.txt").write_text("keep")
    code, err = _export([run_dir / "checkpoints" / "step-1", run_dir / "wandb", "--force"], capsys)
    assert code == 2 and "files of the run" in err and (run_dir / "wandb" / "log.txt").read_text() == "keep"
    import shutil

    shutil.rmtree(run_dir / "hf-step-1")
    shutil.rmtree(run_dir / "wandb")


def test_export_onto_a_symbolic_link_is_refused(run_dir, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, err = _export([run_dir / "checkpoints" / "step-1", tmp_path / "link", "--force"], capsys)
    assert code == 2 and "symbolic link" in err and (tmp_path / "real" / "keep.txt").read_text() == "mine"


def test_exported_folder_has_a_plain_folders_mode(run_dir, tmp_path, capsys):
    import os

    code, _ = _export([run_dir / "checkpoints" / "step-1", tmp_path / "hf"], capsys)
    umask = os.umask(0)
    os.umask(umask)
    assert code == 0 and (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_onto_a_file_is_refused_and_leaves_no_temporary_folder(run_dir, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    code, err = _export([run_dir / "checkpoints" / "step-1", target], capsys)
    assert code == 2 and "is not a folder" in err
    assert target.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_export_with_force_replaces_only_after_the_new_folder_is_complete(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _ = _export([run_dir / "checkpoints" / "step-1", out, "--force"], capsys)
    assert code == 0 and (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left


def test_convert_gguf_refuses_the_folder_holding_its_input(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    code = main(["convert", "gguf", str(gguf), str(tmp_path), "--force"])
    assert code == 2 and "would change or delete" in capsys.readouterr().err and gguf.is_file()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_MARKER}",))


_MARKER = Path("/tmp/longctx-pwned-marker")


def _planted(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    step = tmp_path / "checkpoints" / "step-1"
    shutil.copytree(run_dir / "checkpoints" / "step-1", step)
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    ckpt._write_manifest(step)  # re-hashed: the manifest proves integrity, not origin
    assert ckpt.problem(step) is None
    return step


def test_a_planted_pickle_in_checkpoint_metadata_never_runs(run_dir, tmp_path, capsys):
    _MARKER.unlink(missing_ok=True)
    step = _planted(run_dir, tmp_path)
    code, err = _export([step, tmp_path / "out"], capsys)
    assert code == 2 and "posix.system" in err and ".metadata" in err and "not DCP checkpoint metadata" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not _MARKER.exists()
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'resumed'}", "train.max_steps=2", "train.warmup_steps=0", f"train.resume={step}",
                 "log.wandb=false"])
    assert code == 2 and "posix.system" in capsys.readouterr().err
    assert not _MARKER.exists()


def test_a_bytes_entry_in_checkpoint_metadata_is_refused(run_dir, tmp_path, capsys):
    """DCP loads a "bytes" entry with an unrestricted torch.load: our checkpoints hold tensors only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step = _planted(run_dir, tmp_path)
    with open(run_dir / "checkpoints" / "step-1" / "dcp" / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    name = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[name] = BytesStorageMetadata()
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    ckpt._write_manifest(step)
    code, err = _export([step, tmp_path / "out"], capsys)
    assert code == 2 and "BytesStorageMetadata" in err and "tensors only" in err, err
