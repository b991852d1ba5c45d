"""`longctx elimination fit RECIPE --out FOLDER` (options in cli.py): trains the pattern predictors
(memory/predictors.py) of the recipe's eliminating layers against the exact block scores, with the
model frozen.

1. Capture: the recipe's model (no gradient) runs `--samples` rows of `--seq-len` tokens of the
   recipe's training documents (and `--held-out` rows of its held-out documents) up to the last
   eliminating layer, its layers eliminating on the exact scores (so each layer's input is what it
   is in training, after the layers before it eliminated: fitted on dense inputs, the predictors'
   recall at SmolLM2's layer 28 fell from 0.65 to 0.14); each eliminating layer keeps its normed
   input (bf16) and the exact score of each key block (elimination.block_scores, over the number of
   query blocks).
2. Fit: per layer, Adam on SmoothL1 between the predicted score of every key block and the log of
   its exact score (over their mean on the training rows, + 1e-3): the selection only ranks the
   scores, and the log keeps the attention-sink block from drowning the others.
3. Recall: on the held-out rows, the share of the tokens the exact scores keep (at the layer's
   keep ratio, memory.elimination) that the predicted scores keep too.

FOLDER/fit_state.pt holds the run every --save-every epochs: a rerun with the same settings
resumes there (it captures again, the same rows in the same order). FOLDER/predictors.safetensors
and FOLDER/fit.json are written at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.pack import PackedRows
from ..data.sources import DataError
from ..data.tokenize import load_tokenizer
from ..kernels.capability import default_device
from ..memory import elimination as el
from ..memory.predictors import FILE, BlockPredictor, Predictors, PredictorShape, recall
from ..parallel import mesh as mesh_lib
from ..recipes import schema
from ..recipes.schema import RecipeError
from .build import build_model, elimination_policy, held_out_split, token_store

log = logging.getLogger("longctx")
STATE = "fit_state.pt"
_SUMMARY = ("recall_min", "recall_mean", "recall", "predictor_flops_per_token", "exact_flops_per_token",
            "predictor_seconds", "exact_seconds")


def _check(args) -> None:
    for name in ("seq_len", "samples", "held_out", "epochs", "batch", "token_rank", "width", "heads", "head_dim",
                 "save_every"):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if not args.lr > 0:
        raise RecipeError(f"--lr={args.lr}: expected a positive learning rate")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out={args.out}: exists and is not a folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("longctx elimination fit runs in one process (not under torchrun)")


def fit_command(args) -> int:
    _check(args)
    recipe = schema.load(args.recipe, args.overrides)
    e = recipe.memory.elimination
    if e.keep_ratio == 1.0:
        raise RecipeError("memory.elimination.keep_ratio=1: no layer eliminates, so there is nothing to fit; set a "
                          "keep_ratio below 1")
    bt = e.block_tokens
    if args.seq_len % bt or args.seq_len < 2 * bt:
        raise RecipeError(f"--seq-len={args.seq_len}: expected a multiple of memory.elimination.block_tokens={bt} "
                          f"of at least {2 * bt}")
    try:
        device = default_device(recipe.run.device)
    except RuntimeError as err:
        raise RecipeError(str(err)) from None
    mesh = mesh_lib.init(device)
    torch.manual_seed(recipe.run.seed)
    # the model alone in one process (no recompute, sharding or sp), eliminating on the exact scores:
    # a layer's input is what it is in training, where the layers before it eliminate too
    exact = dataclasses.replace(
        recipe, memory=dataclasses.replace(recipe.memory, policy="none", elimination=dataclasses.replace(
            e, source="exact", predictors=None)),
        parallel=dataclasses.replace(recipe.parallel, sharding="none", sp_degree=1, vocab_parallel="off"))
    model, model_dir, _ = build_model(exact, mesh)
    model.eval().requires_grad_(False)
    for lay in model.elimination:
        lay.in_eval = True
    cfg = model.config
    policy = elimination_policy(recipe, cfg.num_layers)
    layers = [i for i, k in enumerate(policy.keep) if k < 1.0]
    shape = PredictorShape(cfg.hidden_size, bt, args.token_rank, args.width, args.heads, args.head_dim)
    settings = {"model": str(model_dir or "random init"), "num_layers": cfg.num_layers, "layers": layers,
                "keep": [policy.keep[i] for i in layers], "seq_len": args.seq_len, "samples": args.samples,
                "held_out": args.held_out, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                "shape": dataclasses.asdict(shape), "seed": recipe.run.seed, "data": str(recipe.data.source),
                "dtype": recipe.run.dtype, "inputs": "eliminating on the exact scores"}
    out = Path(args.out)
    state = _resume_state(out, settings)
    done = out / "fit.json"
    if state is not None and state["epoch"] == args.epochs and (out / FILE).is_file() and done.is_file():
        log.info("%s holds this fit, finished: nothing to do", out)  # a rerun of a finished fit
        print(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k in _SUMMARY}, indent=2))
        print(out / FILE)
        return 0
    if state is None and (out / FILE).is_file():
        raise RecipeError(f"--out={out}: holds {FILE} from another fit (no {STATE} of these settings); use another "
                          "--out or delete it")
    rows, held = _rows(recipe, model_dir, mesh, args)
    try:  # before the capture: a folder that cannot be written fails now, not after the work
        out.mkdir(parents=True, exist_ok=True)
        (out / (STATE + ".tmp")).touch()
    except OSError as err:
        raise RecipeError(f"--out={out}: cannot write there ({err.strerror or err})") from None
    autocast = torch.bfloat16 if recipe.run.dtype == "bf16" else None
    t0 = time.perf_counter()
    inputs, targets = _capture(model, layers, rows, bt, device, autocast, "capture (training rows)")
    h_inputs, h_targets = _capture(model, layers, held, bt, device, autocast, "capture (held-out rows)")
    log.info("captured %d + %d rows of %d tokens at %d layers (%.0fs)", len(rows), len(held), args.seq_len,
             len(layers), time.perf_counter() - t0)
    preds = {i: BlockPredictor(shape).to(device).train() for i in layers}
    opts = {i: torch.optim.Adam(preds[i].parameters(), lr=args.lr) for i in layers}
    history, start = [], 0
    if state is not None:
        for i in layers:
            preds[i].load_state_dict(state["predictors"][i])
            opts[i].load_state_dict(state["optim"][i])
        history, start = state["history"], state["epoch"]
        log.info("resuming %s at epoch %d of %d", out / STATE, start, args.epochs)
    scales = {i: targets[i].mean().clamp_min(1e-12).item() for i in layers}
    gen = torch.Generator().manual_seed(recipe.run.seed)
    for _ in range(start):  # the same row order as an uninterrupted run
        torch.randperm(len(rows), generator=gen)
    from tqdm import tqdm

    bar = tqdm(total=args.epochs, initial=start, desc="fit predictors", unit="epoch", file=sys.stderr,
               disable=not sys.stderr.isatty() and "LONGCTX_PROGRESS" not in os.environ)
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(rows), generator=gen)
        losses = []
        for i in layers:
            for b in order.split(args.batch):
                loss = _loss(preds[i], inputs[i][b].to(device), targets[i][b].to(device) / scales[i])
                opts[i].zero_grad(set_to_none=True)
                loss.backward()
                opts[i].step()
                losses.append(loss.item())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            _save_state(out, settings, epoch + 1, preds, opts, history)
    bar.close()
    recalls = {i: _recall(preds[i], h_inputs[i], h_targets[i], policy.keep[i], bt, device) for i in layers}
    costs = _costs(model, preds, layers, held, bt, device, autocast, args.seq_len)
    info = settings | {"recall": {str(i): r for i, r in recalls.items()}, "recall_min": min(recalls.values()),
                       "recall_mean": float(np.mean(list(recalls.values()))), "final_loss": history[-1]["loss"],
                       "score_scale": {str(i): s for i, s in scales.items()}} | costs
    Predictors(shape, preds, info).save(out)
    (out / "fit.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in _SUMMARY}, indent=2))
    print(out / FILE)
    return 0


def _resume_state(out: Path, settings: dict) -> dict | None:
    file = out / STATE
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"epoch", "history", "predictors", "optim"} <= set(state):
            raise ValueError("not a fit state")
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: say which, touch nothing
        raise RecipeError(f"--out={out}: {STATE} cannot be read ({type(e).__name__}); delete it to start over") from None
    if state.get("settings") != settings:
        old = state.get("settings") or {}
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        raise RecipeError(f"--out={out}: holds a fit with other settings ({'; '.join(diff[:3])}); use another --out "
                          f"or delete {file}")
    return state


def _save_state(out: Path, settings: dict, epoch: int, preds, opts, history) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATE + ".tmp")
    torch.save({"settings": settings, "epoch": epoch, "history": history,
                "predictors": {i: p.state_dict() for i, p in preds.items()},
                "optim": {i: o.state_dict() for i, o in opts.items()}}, tmp)
    tmp.replace(out / STATE)


def _rows(recipe, model_dir, mesh, args) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = load_tokenizer(recipe.model.tokenizer, model_dir)
    store = token_store(recipe, tokenizer, mesh)
    held, train = held_out_split(store.num_documents, recipe.run.seed, recipe.data.eval_fraction)
    if not len(held):
        raise RecipeError(f"data.eval_fraction={recipe.data.eval_fraction}: the recall is measured on held-out "
                          "documents; set data.eval_fraction > 0")
    out = []
    for docs, n, what in ((train, args.samples, "training"), (held, args.held_out, "held-out")):
        try:
            packed = PackedRows([store.document(int(i)) for i in docs], args.seq_len)
            rows = packed.gather(packed.train_ids[:n])[:, :args.seq_len]
        except DataError:
            raise RecipeError(f"--seq-len={args.seq_len}: the {what} documents do not fill one row of "
                              f"{args.seq_len + 1} tokens; lower --seq-len") from None
        if len(rows) < n:
            log.warning("%s documents fill %d rows of %d tokens, not %d", what, len(rows), args.seq_len, n)
        out.append(torch.from_numpy(rows.astype(np.int64)))
    return out[0], out[1]


@torch.no_grad()
def _capture(model, layers: list[int], rows: torch.Tensor, bt: int, device, autocast, desc: str):
    """Per eliminating layer: the normed inputs [N, S, hidden] (bf16, host) and the exact key-block
    scores over the number of query blocks [N, S/bt] (fp32, host)."""
    from tqdm import tqdm

    inputs = {i: [] for i in layers}
    targets = {i: [] for i in layers}
    for row in tqdm(rows, desc=desc, unit="row", file=sys.stderr,
                    disable=not sys.stderr.isatty() and "LONGCTX_PROGRESS" not in os.environ):
        ids = row[None].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            x = model.model.embed_tokens(ids)
            cos, sin = model.rope_cos_sin(torch.arange(ids.shape[1], device=device)[None], x.dtype)
            for i, block in enumerate(model.model.layers[:layers[-1] + 1]):
                if i in inputs:
                    inputs[i].append(block.input_layernorm(x).to(torch.bfloat16).cpu())
                    q, k = el._projections(block, x)
                    targets[i].append((el.block_scores(q, k, bt) / (ids.shape[1] // bt)).cpu())
                x = block(x, cos, sin)
    return ({i: torch.cat(v) for i, v in inputs.items()}, {i: torch.cat(v) for i, v in targets.items()})


def _loss(pred: BlockPredictor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """target: the exact scores [B, nb] over their training mean."""
    return F.smooth_l1_loss(pred.predict(h.float()), torch.log(target + 1e-3))


@torch.no_grad()
def _recall(pred: BlockPredictor, h: torch.Tensor, target: torch.Tensor, keep: float, bt: int, device) -> float:
    hits = total = 0
    for row, t in zip(h, target):
        scores = pred.scores(row[None].to(device).float())
        length = row.shape[0]
        a, b = recall(el.select(scores, length, 1, keep, bt), el.select(t[None].to(device), length, 1, keep, bt))
        hits, total = hits + a, total + b
    return hits / max(total, 1)


@torch.no_grad()
def _costs(model, preds, layers, held, bt, device, autocast, seq_len) -> dict:
    """Scoring cost per token, counted (multiply-adds x 2 at seq_len) and timed (one held-out row
    through the first eliminating layer, exact `global_scores` vs `predicted_scores`, best of 3)."""
    cfg = model.config
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    exact = 2 * cfg.hidden_size * (hq + hkv) * d + 2 * seq_len * hq * d
    i = layers[0]
    block = model.model.layers[i]
    ids = held[:1].to(device)
    spans = el.block_spans(seq_len, 1, bt)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        x = model.model.embed_tokens(ids)
        cos, sin = model.rope_cos_sin(torch.arange(seq_len, device=device)[None], x.dtype)
        for blk in model.model.layers[:i]:
            x = blk(x, cos, sin)
        times = {}
        for name, fn in (("exact", lambda: el.global_scores(block, x, spans, bt, 1, None)),
                         ("predictor", lambda: el.predicted_scores(block, preds[i], x, spans, bt, 1, None))):
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    return {"predictor_flops_per_token": preds[i].flops_per_token(), "exact_flops_per_token": exact,
            "predictor_seconds": times["predictor"], "exact_seconds": times["exact"], "timed_layer": i,
            "predictor_params_per_layer": sum(p.numel() for p in preds[i].parameters())}
