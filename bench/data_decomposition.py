"""Dataset decomposition vs concat-and-chunk on the default corpus (arXiv 2405.13226, §3).

Trains the same model for the same number of tokens both ways (same lr schedule, seed and
held-out documents) and prints one JSON object per batching, then a summary:
  attn_flops_ratio          concat-and-chunk / decomposition causal-attention FLOPs per epoch
  tokens_per_second_ratio   decomposition / concat-and-chunk training throughput
  loss                      held-out loss of each after the same tokens (rows of eval_len)

  python -m longctx.bench.data_decomposition            # SmolLM2-135M, max length 8192, bf16
  python -m longctx.bench.data_decomposition --tiny     # the tiny random model (minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from tempfile import mkdtemp

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _run(base: Path, overrides: list[str]) -> dict:
    from longctx.parallel import mesh
    from longctx.recipes import schema
    from longctx.train.build import build
    from longctx.train.trainer import evaluate, train

    recipe = schema.load(base, overrides)
    run = build(recipe)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # progress lines to stderr: stdout is JSON only
        history = train(run)["history"]
    seconds = time.perf_counter() - t0
    run.model.eval()
    eval_loss = evaluate(run)
    mesh.destroy()
    tokens = sum(h["step_tokens"] for h in history)
    return {"steps": len(history), "train_tokens": tokens, "train_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2), "eval_loss": round(eval_loss, 4),
            "last_train_loss": round(history[-1]["loss"], 4),
            "seq_lens": sorted({h["seq_len"] for h in history})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead of SmolLM2-135M")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: 2 x max-len")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--source", default="default", help="default (one document per book) or default:chapters")
    args = p.parse_args(argv)
    tps = args.tokens_per_step or 2 * args.max_len
    out = Path(mkdtemp(prefix="longctx-dd-"))
    if args.tiny:
        base = RECIPES / "tiny.yaml"
        common = ["data.max_documents=null", "model.config.max_position_embeddings=" + str(args.max_len), "run.threads=0"]
    else:
        base = RECIPES / "quickstart.yaml"
        common = ["model.rope.type=keep", "~model.rope.factor", "model.max_seq_len=null", "train.export=false",
                  "log.wandb=false"]
    common += [f"data.source={args.source}", f"train.max_steps={args.steps}", "train.warmup_steps=1", "train.lr=5e-5" if not args.tiny else "train.lr=3e-3",
               "data.eval_fraction=0.1", f"eval.seq_len={args.eval_len}", "eval.batches=2", "log.every=1",
               "train.checkpoint_every=0"]
    import torch
    from longctx.data.decompose import attention_flops
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_data

    rows = {}
    for batching in ("pack", "decompose"):
        extra = [f"data.batching={batching}", f"run.dir={out / batching}"]
        if batching == "pack":
            # the base recipe's decomposition keys have no effect here (and are refused as such)
            extra += [f"data.seq_len={args.max_len}", f"train.batch_size={tps // args.max_len}", "~data.min_len",
                      "~data.max_len", "~data.tokens_per_step"] + (["~data.curriculum"] if not args.tiny else [])
        else:
            extra += [f"data.max_len={args.max_len}", f"data.tokens_per_step={tps}", "data.min_len=64",
                      "data.curriculum=grow_p2"]
        row = _run(base, common + extra)
        row.update(batching=batching, source=args.source, max_len=args.max_len, tokens_per_step=tps,
                   model="tiny" if args.tiny else "SmolLM2-135M-Instruct", machine=platform.machine())
        rows[batching] = row
        print(json.dumps(row), flush=True)
    # attention FLOPs per epoch over the same training documents
    recipe = schema.load(base, common + [f"data.max_len={args.max_len}", f"data.tokens_per_step={tps}", "data.min_len=64"])
    data, _, _, _ = build_data(recipe, None if args.tiny else _model_dir(recipe), Mesh(0, 1, 0, 1, None, torch.device("cpu")),
                            10**9)
    b = data.buckets
    dd = attention_flops(b.sizes)
    cc = attention_flops({args.max_len: b.transitions_kept // args.max_len})
    summary = {
        "attn_flops_ratio": round(cc / dd, 3),
        "tokens_per_second_ratio": round(rows["decompose"]["tokens_per_second"] / rows["pack"]["tokens_per_second"], 3),
        "loss": {"decomposition": rows["decompose"]["eval_loss"], "concat_and_chunk": rows["pack"]["eval_loss"]},
    }
    print(json.dumps({"summary": summary}))
    return 0


def _model_dir(recipe):
    from longctx.train.build import default_model_dir

    return default_model_dir()


if __name__ == "__main__":
    raise SystemExit(main())
