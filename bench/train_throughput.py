"""Trainer throughput and peak memory: longctx vs transformers' LlamaForCausalLM on SmolLM2-135M.

Each case runs in a fresh subprocess (peak RSS is per process): one warm-up step at a short length,
then timed optimizer steps (forward + backward + AdamW) at the case's sequence length, batch 1, fp32,
same weights and tokens for both. Prints one JSON object per case and a summary last.

  python -m longctx.bench.train_throughput [--lengths 2048,4096,8192] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import time

from ._subprocess import run_case


def _case(impl: str, seq_len: int, checkpointing: bool, steps: int, loss_impl: str) -> dict:
    import resource

    import torch
    from longctx.train.build import default_model_dir

    folder = default_model_dir()
    tokens = torch.randint(0, 49152, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if impl == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing

        def step(x, y):
            # transformers' own loss; shift_labels gives it exactly our (already shifted) targets
            return model(x, labels=y, shift_labels=y).loss
    else:
        from longctx.parallel.mesh import Mesh
        from longctx.recipes import schema
        from longctx.train.build import build_model

        recipe = schema.load(None, [f"memory.policy={'full' if checkpointing else 'none'}",
                                    f"loss.impl={loss_impl}"])
        model, _, _ = build_model(recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")))

        def step(x, y):
            return model(x, labels=y) / y.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def one(x, y):
        loss = step(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    one(inputs[:, :256], labels[:, :256])  # warm-up: kernel selection, allocator
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one(inputs, labels)
    seconds = (time.perf_counter() - t0) / steps
    return {
        "impl": impl, "seq_len": seq_len, "activation_checkpointing": checkpointing, "dtype": "fp32",
        "step_seconds": round(seconds, 3), "tokens_per_second": round(seq_len / seconds, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loss": round(loss, 4),
        "threads": torch.get_num_threads(), "loss_impl": loss_impl if impl == "longctx" else "transformers",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--impls", default="longctx,transformers")
    p.add_argument("--checkpointing", default="false,true")
    p.add_argument("--loss", default="cce", help="longctx loss.impl (cce or reference)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        impl, seq_len, ck = args.case.split(":")
        print(json.dumps(_case(impl, int(seq_len), ck == "true", args.steps, args.loss)))
        return 0
    rows = []
    for ck in args.checkpointing.split(","):
        for seq_len in map(int, args.lengths.split(",")):
            for impl in args.impls.split(","):
                rows.append(run_case("longctx.bench.train_throughput",
                                     ["--case", f"{impl}:{seq_len}:{ck}", "--steps", str(args.steps), "--loss", args.loss],
                                     {"impl": impl, "seq_len": seq_len, "activation_checkpointing": ck == "true"}))
    pairs = {}
    for r in rows:
        if "error" not in r:
            pairs.setdefault((r["seq_len"], r["activation_checkpointing"]), {})[r["impl"]] = r
    ratios = {
        f"{s}{'_ckpt' if ck else ''}": {
            "tokens_per_second_ratio": round(v["longctx"]["tokens_per_second"] / v["transformers"]["tokens_per_second"], 3),
            "peak_memory_ratio": round(v["longctx"]["peak_rss_bytes"] / v["transformers"]["peak_rss_bytes"], 3),
        }
        for (s, ck), v in sorted(pairs.items()) if {"longctx", "transformers"} <= set(v)
    }
    print(json.dumps({"summary": {"longctx_over_transformers": ratios}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
