"""Distributed checkpoints with exact resume (torch.distributed.checkpoint, DCP).

    step-N/
      dcp/                 model and optimizer tensors: `.metadata` + one `__<rank>_0.distcp` per rank;
                           FSDP2's sharded parameters are saved as shards and resharded on load to
                           whatever world size loads them (export reads them in one process)
      config.json          the model's HF config (+ tokenizer files): what export needs
      trainer_state.json   step, token count, world/dp/sp/sharding, scheduler, the optimizer's
                           hyper-parameters, the sampler's state
      rng/rank-<r>.pt      each rank's RNG states (tensors only)
      manifest.json        every file's size and sha256, written last

Every rank writes its shard into `step-N.tmp`; rank 0 writes the manifest and renames the folder
when all ranks are done, so a crash mid-save never damages the last good checkpoint and a
half-written folder is never taken for one. The folder must be on a filesystem every rank sees.

No code runs from checkpoint files. The trust boundary: a checkpoint is data, even one from
someone else. Only tensors go through DCP and the rest is JSON; `torch.load(weights_only=True)`
reads the RNG files and DCP's tensor data. DCP's `.metadata` is a pickle: it is read by an
unpickler that admits only the metadata classes DCP writes (anything else is an error naming the
file and the class, before any of it runs), and every entry we load must be tensor metadata (a
"bytes" entry would go through DCP's unrestricted torch.load). The sha256 manifest proves a
file is what was written, not who wrote it: it is checked, and it is not the boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..models.hf import CheckpointError, copy_tokenizer
from ..parallel import vocab

log = logging.getLogger("longctx")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _split_optimizer(flat: dict) -> tuple[dict, dict]:
    """(tensors for DCP, JSON-able hyper-parameters) of a flattened optimizer state dict."""
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    hparams = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if k not in tensors}
    return tensors, hparams


def _kill_point(point: str, folder: Path) -> None:
    """Tests only: LONGCTX_KILL_DURING_SAVE=<point>:<step folder name> SIGKILLs this process at
    that point of that save (dcp, manifest, rename, prune), to show what a crash there leaves."""
    want = os.environ.get("LONGCTX_KILL_DURING_SAVE")
    if want and want == f"{point}:{folder.name}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and `folder` itself, on disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        _fsync(path)
    _fsync(folder)


def save(folder: Path, model, optimizer, scheduler, state: dict, keep_last: int,
         tokenizer_dir: Path | None = None) -> Path:
    """Collective: every rank calls it. `state` is JSON (step, tokens, sampler, run_id, ...).
    Files are fsynced before the manifest, the folder before the rename, the rename before
    pruning; pruning touches only this run's (state["run_id"]) other checkpoints."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    rank = _rank()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # a crashed earlier attempt
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    optim_tensors, hparams = _split_optimizer(optim_sd)
    vocab.as_dtensors(model, model_sd, optim_tensors)  # vocabulary shards saved as the rows of the whole weight
    dcp.save({"model": model_sd, "optim": optim_tensors}, checkpoint_id=tmp / "dcp", no_dist=not _distributed())
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng" / f"rank-{rank}.pt")
    if rank == 0:
        full = {**state, "scheduler": scheduler.state_dict(), "optimizer_hparams": hparams,
                "world": dist.get_world_size() if _distributed() else 1}
        (tmp / STATE).write_text(json.dumps(full, indent=1))
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
    _barrier()
    if rank == 0:
        _kill_point("dcp", folder)
        _fsync_tree(tmp)
        _write_manifest(tmp)
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _kill_point("manifest", folder)
        if folder.exists():  # this run's older branch is replaced; another run's is set aside, never deleted
            owner = run_id_of(folder)
            if owner and owner != state.get("run_id"):
                folder.rename(folder.with_name(f"{folder.name}.other-run-{owner[:8]}"))
            else:
                shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync(folder.parent)
        _kill_point("rename", folder)
        _prune(folder, keep_last, state.get("run_id"))
        _kill_point("prune", folder)
    _barrier()
    return folder


# --- reading DCP without running code -----------------------------------------------------------
# What DCP's metadata pickle references (torch 2.4-2.13): its dataclasses, torch.Size, dtypes,
# layouts (by name) and the path type of the storage info. Constructing any of these runs no code
# of the file's choosing.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpoint(CheckpointError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                         torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{self.path}: refers to {module}.{name}, which is not DCP checkpoint metadata; "
                               "refusing to load it (a checkpoint never needs to run code)")


class SafeReader(dcp.FileSystemReader):
    """DCP's filesystem reader with its metadata read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):  # DCP would torch.load it without weights_only
                raise UnsafeCheckpoint(f"{path}: entry {key!r} is {type(entry).__name__}, not a tensor; "
                                       "longctx checkpoints hold tensors only")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def dcp_load(state: dict, folder: Path, what: str) -> None:
    """dcp.load through SafeReader; a mismatch is a CheckpointError naming `folder` (DCP's
    CheckpointException is a BaseException, so `except Exception` alone misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    # The metadata first, here: DCP would catch the refusal, log it with tracebacks and fall back.
    SafeReader(folder / "dcp").read_metadata()
    try:
        dcp.load(state, storage_reader=SafeReader(folder / "dcp"), no_dist=not _distributed())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises several types for a mismatch
        # CheckpointException.failures maps rank -> (exception, traceback): the first rank's own error
        failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()] if isinstance(
            e, CheckpointException) else []
        for inner in failures:
            if isinstance(inner, CheckpointError):
                raise inner from None
        cause = failures[0] if failures else e
        first = str(cause).strip().splitlines() or [""]
        raise CheckpointError(f"{folder}: {what} ({type(cause).__name__}: {first[0][:300]})") from None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    part = folder / (MANIFEST + ".part")
    part.write_text(json.dumps({"files": files}, indent=1))
    os.replace(part, folder / MANIFEST)


def problem(folder: Path, hashes: bool = True) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is): no manifest, a file missing,
    of the wrong size or (with hashes) with other contents than when it was written."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (an interrupted save?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if hashes and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def step_folders(root: Path) -> list[Path]:
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in step_folders(root) if problem(p, hashes=False) is None]


def newest_valid(root: Path, run_id: str | None = None) -> Path | None:
    """`resume: auto`: the newest checkpoint that verifies and (given `run_id`) belongs to this
    run; the ones skipped get a warning."""
    for folder in reversed(step_folders(root)):
        owner = run_id_of(folder) if run_id else None
        why = problem(folder) if not owner or owner == run_id else f"written by another run ({owner})"
        if why is None:
            return folder
        log.warning("resume: skipping %s: %s", folder, why)
    return None


def run_id_of(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / STATE).read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _prune(written: Path, keep_last: int, run_id: str | None) -> None:
    """Keeps this run's newest `keep_last` checkpoints, `written` always; other runs' (and ones
    that name no run) are never touched."""
    ours = [p for p in complete_checkpoints(written.parent) if p != written and run_id and run_id_of(p) == run_id]
    for old in ours[:max(len(ours) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load(folder: Path, model, optimizer, scheduler) -> dict:
    """Collective: restores model, optimizer and scheduler in place (resharding model and
    optimizer to this run's world size) and this rank's RNG; returns the trainer state."""
    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    optim_tensors, _ = _split_optimizer(optim_sd)
    wrapped = vocab.as_dtensors(model, model_sd, optim_tensors)  # loaded as this run's rows of the whole weight
    dcp_load({"model": model_sd, "optim": optim_tensors}, folder, "the model/optimizer do not match this checkpoint")
    vocab.as_local(wrapped)
    hparams = {k: (tuple(v) if isinstance(v, list) else v) for k, v in state["optimizer_hparams"].items()}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict={**optim_tensors, **hparams},
                   options=_OPTIONS)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = folder / "rng" / f"rank-{_rank()}.pt"
    world = dist.get_world_size() if _distributed() else 1
    if rng_file.is_file() and state.get("world") == world:
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif _rank() == 0:
        log.warning("resume: %s was written by %s ranks, this run has %d: weights and optimizer resharded, "
                    "RNG states not restored", folder, state.get("world"), world)
    return state
