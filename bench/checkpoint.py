"""Checkpoint save and load time and size (train/checkpoint.py: DCP + manifest with sha256), for
the tiny recipe's model and SmolLM2-135M, one process, fp32 weights + AdamW states after one step.

Save includes hashing and the manifest; load includes verifying every hash (what `resume: auto`
does) and restoring model, optimizer, scheduler and RNG. Prints one JSON object per model.

  python -m longctx.bench.checkpoint [--models tiny,smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

GiB = 1 << 30


def _model(name: str):
    from longctx.kernels.attention import local_attention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.models.config import ModelConfig
    from longctx.models.llama import CausalLM

    if name == "tiny":
        cfg = ModelConfig(**_tiny_config())
        model = CausalLM(cfg, local_attention, loss=lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum"))
        model.init_weights(0)
        return model
    from longctx.models.hf import load_model_folder, load_weights
    from longctx.train.build import default_model_dir

    folder = default_model_dir()
    model = CausalLM(load_model_folder(folder), local_attention,
                     loss=lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum"))
    load_weights(model, folder)
    return model


def _tiny_config() -> dict:
    from longctx.recipes import schema

    return schema.load(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml", []).model.config


def _case(name: str, repeats: int) -> dict:
    from longctx.train import checkpoint as ckpt
    from longctx.train.optim import build_optimizer, build_scheduler

    model = _model(name)
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), 1e-8)
    scheduler = build_scheduler(optimizer, 10, 0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    optimizer.step()
    scheduler.step()
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            folder = Path(tmp) / f"step-{i + 1}"
            t0 = time.perf_counter()
            ckpt.save(folder, model, optimizer, scheduler, {"step": i + 1, "tokens": 0}, keep_last=1)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert ckpt.problem(folder) is None
            ckpt.load(folder, model, optimizer, scheduler)
            loads.append(time.perf_counter() - t0)
        files = [p for p in folder.rglob("*") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": nbytes,
            "files": len(files), "save_seconds": round(min(saves), 3), "load_seconds": round(min(loads), 3),
            "save_gib_per_s": round(nbytes / GiB / min(saves), 3), "load_gib_per_s": round(nbytes / GiB / min(loads), 3),
            "repeats": repeats, "threads": torch.get_num_threads(), "machine": platform.machine()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in ("tiny", "smollm2"):
            p.error(f"--models: {name!r} is not one of tiny, smollm2")
        print(json.dumps(_case(name, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
