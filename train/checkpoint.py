"""Checkpoints of replicated (single-process or data-parallel) runs.

A checkpoint folder is an HF model folder (config.json + model.safetensors + tokenizer files)
plus optimizer.pt, trainer_state.json and manifest.json (sizes). It is written to
`<name>.tmp` and renamed when complete, so a crash mid-save never damages the last good one;
only folders with a manifest count as complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..models.hf import save_folder

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    pass


def save(folder: Path, model, optimizer, scheduler, state: dict, tokenizer_dir: Path | None, keep_last: int) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    save_folder(model, tmp, tokenizer_dir=tokenizer_dir)  # writes tmp.tmp, renames to tmp
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"files": sizes}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _prune(folder.parent, keep_last)
    return folder


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and _step_of(p) >= 0 and is_complete(p)]
    return sorted(found, key=_step_of)


def is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items() if n != MANIFEST)


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(folder: Path, optimizer, scheduler) -> dict:
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: not a complete checkpoint (missing or mismatched {MANIFEST})")
    blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return json.loads((folder / "trainer_state.json").read_text())
