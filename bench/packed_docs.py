"""Packed documents (issue 18) vs concat-and-chunk and vs dataset decomposition, equal tokens.

Trains the same model for the same tokens three ways (same lr schedule, seed and held-out
documents; the held-out loss is measured on the same concat-and-chunk rows for all three) and
prints one JSON object per batching, then a summary:
  padding_fraction                   pad share of the packed_docs rows (target <= 2%)
  attn_flops_ratio_vs_pack           document-masked attention FLOPs of the packed rows over the
                                     same rows attended causally across documents (pack's cost)
  tokens_per_second_ratio_vs_pack    packed_docs / pack training throughput (valid labels per s)
  loss_vs_pack, loss_vs_decompose    packed_docs held-out loss minus theirs (negative = better)

  python -m longctx.bench.packed_docs               # SmolLM2-135M, 8K rows, default:chapters, bf16
  python -m longctx.bench.packed_docs --tiny        # the tiny random model (a minute)
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from tempfile import mkdtemp

from .data_decomposition import RECIPES, _model_dir, _run


def _flops(rows) -> tuple[float, float]:
    """(masked, across documents) causal attention pairs of PackedDocRows, summed over rows."""
    import numpy as np

    masked = across = 0.0
    for r in range(rows.num_rows):
        lengths = np.diff(rows.cu_seqlens(r)).astype(np.float64)
        masked += float((lengths * (lengths + 1) / 2).sum())
        across += rows.seq_len * (rows.seq_len + 1) / 2
    return masked, across


def _difference(a: float | None, b: float | None) -> float | None:
    """Two eval losses' difference; None when either had no label to score (chat data, prompts only)."""
    return None if a is None or b is None else round(a - b, 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead of SmolLM2-135M")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--rows", type=int, default=1, help="rows per step (pack, packed_docs)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--source", default="default:chapters")
    p.add_argument("--variants", default="pack,packed_docs,decompose")
    args = p.parse_args(argv)
    L, tps = args.seq_len, args.rows * args.seq_len
    out = Path(mkdtemp(prefix="longctx-packed-docs-"))
    if args.tiny:
        base = RECIPES / "tiny.yaml"
        common = ["data.max_documents=null", f"model.config.max_position_embeddings={L}", "run.threads=0",
                  "train.lr=3e-3"]
    else:
        base = RECIPES / "quickstart.yaml"
        common = ["model.rope.type=keep", "~model.rope.factor", "model.max_seq_len=null", "train.export=false",
                  "log.wandb=false", "eval.tasks=[]", "~eval.lengths", "~eval.depths", "~eval.native_rope",
                  "train.lr=5e-5"]
    common += [f"data.source={args.source}", f"train.max_steps={args.steps}", "train.warmup_steps=1",
               "data.eval_fraction=0.1", f"eval.seq_len={args.eval_len}", "eval.batches=2", "log.every=1",
               "train.checkpoint_every=0", "eval.every=0"]
    rows = {}
    for batching in args.variants.split(","):
        extra = [f"data.batching={batching}", f"run.dir={out / batching}"]
        if batching in ("pack", "packed_docs"):
            extra += [f"data.seq_len={L}", f"train.batch_size={args.rows}", "~data.min_len", "~data.max_len",
                      "~data.tokens_per_step"] + (["~data.curriculum"] if not args.tiny else [])
        else:
            extra += [f"data.max_len={L}", f"data.tokens_per_step={tps}", "data.min_len=64", "data.curriculum=grow_p2"]
        row = _run(base, common + extra)
        row.update(batching=batching, source=args.source, seq_len=L, tokens_per_step=tps,
                   model="tiny" if args.tiny else "SmolLM2-135M-Instruct", machine=platform.machine())
        rows[batching] = row
        print(json.dumps(row), flush=True)
    # packing efficiency and attention work of the packed rows over the same training documents
    import torch
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_data

    recipe = schema.load(base, common + ["data.batching=packed_docs", f"data.seq_len={L}", f"train.batch_size={args.rows}",
                                         "~data.min_len", "~data.max_len", "~data.tokens_per_step",
                                         f"run.dir={out / 'flops'}"] + (["~data.curriculum"] if not args.tiny else []))
    data, _, _, _ = build_data(recipe, None if args.tiny else _model_dir(recipe), Mesh(0, 1, 0, 1, None, torch.device("cpu")),
                               10**9)
    masked, across = _flops(data.rows)
    stats = data.rows.stats()
    summary = {"padding_fraction": stats["padding_fraction"], "documents_per_row_mean": stats["documents_per_row_mean"],
               "attn_flops_ratio_vs_pack": round(masked / across, 4)}
    if "pack" in rows and "packed_docs" in rows:
        summary["tokens_per_second_ratio_vs_pack"] = round(rows["packed_docs"]["tokens_per_second"]
                                                           / rows["pack"]["tokens_per_second"], 3)
        summary["loss_vs_pack"] = _difference(rows["packed_docs"]["eval_loss"], rows["pack"]["eval_loss"])
    if "decompose" in rows and "packed_docs" in rows:
        summary["loss_vs_decompose"] = _difference(rows["packed_docs"]["eval_loss"], rows["decompose"]["eval_loss"])
    summary["eval_loss"] = {k: v["eval_loss"] for k, v in rows.items()}
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
