"""Optimizer state and trainable parameters: full fine-tuning vs LoRA (model.adapter) on SmolLM2-135M.

Each case builds the model the trainer builds (train/build.build_model from a recipe, the embedded
SmolLM2-135M-Instruct) and its optimizer (train/optim.build_optimizer: AdamW over the parameters
that require gradients), runs one optimizer step on random tokens, then measures what AdamW holds:
the bytes of the optimizer's actual state tensors (exp_avg, exp_avg_sq, step), and the bytes of
the gradients the backward made. Full fine-tuning is the baseline; LoRA runs at rank 16 on the
default targets (every attention and MLP projection), with LongLoRA's trainable embedding and
norms and without them. One fresh process per case (peak RSS is per process). One JSON object
per case, a summary last.

  python -m longctx.bench.lora_memory [--rank 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import time

from ._subprocess import run_case

CASES = {
    "full": [],
    "lora": ["model.adapter.type=lora"],  # trainable: [embed, norm] (the default)
    "lora_adapters_only": ["model.adapter.type=lora", "model.adapter.trainable=[]"],
}


def _case(name: str, rank: int, seq_len: int) -> dict:
    import platform
    import resource

    import torch
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_model
    from longctx.train.optim import build_optimizer

    overrides = CASES[name] + ([f"model.adapter.rank={rank}"] if name != "full" else [])
    recipe = schema.load(None, overrides)
    torch.manual_seed(0)
    model, _, _ = build_model(recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")))
    t = recipe.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]) / seq_len
    loss.backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    seconds = time.perf_counter() - t0
    state_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                      if isinstance(v, torch.Tensor))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    a = recipe.model.adapter
    return {
        "case": name, "model": "SmolLM2-135M-Instruct", "seq_len": seq_len, "dtype": "fp32",
        "adapter": None if a is None else {"type": a.type, "rank": a.rank, "alpha": a.alpha or 2.0 * a.rank,
                                           "targets": a.targets, "trainable": a.trainable},
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": trainable,
        "optimizer_state_bytes": state_bytes, "grad_bytes": grad_bytes,
        "optimizer_tensors": sum(len(s) for s in optimizer.state.values()), "loss": round(loss.item(), 4),
        "step_seconds": round(seconds, 3), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case, args.rank, args.seq_len)))
        return 0
    rows = {name: run_case("longctx.bench.lora_memory", ["--case", name, "--rank", str(args.rank), "--seq-len",
                                                          str(args.seq_len)], {"case": name})
            for name in CASES}
    full = rows["full"]
    summary = {"baseline": "full", "rank": args.rank}
    for name, row in rows.items():
        if name == "full" or "error" in row or "error" in full:
            continue
        summary[name] = {
            "optimizer_state_ratio": round(row["optimizer_state_bytes"] / full["optimizer_state_bytes"], 4),
            "trainable_ratio": round(row["trainable_params"] / full["trainable_params"], 4),
            "optimizer_state_bytes_saved": full["optimizer_state_bytes"] - row["optimizer_state_bytes"],
        }
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
