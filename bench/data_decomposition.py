"""Dataset decomposition vs concat-and-chunk over one epoch of a corpus (arXiv 2405.13226, §3).

A full epoch of SmolLM2 on this CPU takes days, so the epoch is split into what can be counted
exactly and what has to be measured:

  exact      the epoch's token mix of both batchings, from the trainer's own data path
             (train/build.build_data: held-out split, decomposition, curriculum sampler; and
             concat-and-chunk rows), per seed: tokens at each bucket length, and the causal
             attention FLOPs of the epoch (data/decompose.attention_flops, QK^T and PV forward,
             all layers)
  measured   training throughput at each length the epoch trains (decomposition's buckets, and
             concat-and-chunk's rows): one optimizer step per length and seed (a length only for
             the seeds whose epoch trains it: n in the summary), built with the run's
             own model, recipe and data code (data.curriculum=fixed, data.fixed_len=L) and timed as
             the trainer times step_seconds (train_step: batch, forward, backward, clip, AdamW);
             one untimed warm-up step at the longest length first; seeds are interleaved (every
             length once per seed, then the next seed) so that load drifting on a shared machine
             spreads over all lengths
  computed   the epoch's time = sum over lengths of tokens_L / measured throughput_L (per seed,
             with that seed's mix and measurements), for both batchings, and their ratio. This is
             a prediction from the per-length measurements, not a timed epoch

The seed changes the held-out documents (so the epoch's mix), the data order and the rows timed.
Every step row also records the process CPU seconds and the 1-minute load average, since wall
throughput on a shared machine moves with the other processes. No loss is compared: one step
per length says nothing about quality (bench/packed_docs.py compares losses after 4 steps).

  python -m longctx.bench.data_decomposition                       # books: one document per book
  python -m longctx.bench.data_decomposition --source default:chapters
  python -m longctx.bench.data_decomposition --tiny                # the tiny random model (a minute)

Defaults: SmolLM2-135M-Instruct bf16 autocast, full recompute (the quickstart recipe with its
native RoPE), max length 4096, min length 64, 4096 tokens a step (concat-and-chunk: one row of
4096), 10% of documents held out, seeds 0,1,2. 4096, not the model's 8192: a step of 8192 tokens
took 5-10 min on the shared 2-core box, so 3 seeds x 7 lengths x 2 corpora would take hours;
`--max-len 8192` runs the same bench at 8192 (about twice the time). Lines: "run" (command, commit, machine), one
"epoch_mix" per seed, one "step" per (seed, length), then "summary".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from tempfile import mkdtemp

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _run(base: Path, overrides: list[str]) -> dict:
    """Train a recipe for its max_steps and evaluate once (bench/packed_docs.py uses this)."""
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
            "tokens_per_second": round(tokens / seconds, 2), "eval_loss": _rounded(eval_loss),
            # a step with no label (chat data, prompt only) has no loss: the last that had one
            "last_train_loss": _rounded(next((h["loss"] for h in reversed(history) if h["loss"] is not None), None)),
            "seq_lens": sorted({h["seq_len"] for h in history})}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _model_dir(recipe):
    from longctx.train.build import default_model_dir

    return default_model_dir()


def _commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = sorted(line[3:] for line in dirty if line.strip())
    return head + (f" + uncommitted {changed}" if changed else "") if head else None


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"mean": round(mean, 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "spread": round((max(values) - min(values)) / mean, 3) if mean else None, "n": len(values)}


def _summary(mixes: dict, measured: dict, seeds: list[int], tps: int) -> dict:
    """Per-length statistics, each seed's predicted epoch (its mix, its measurements), the exact FLOPs."""
    def epoch(seed: int, batching: str, rate) -> float:
        return sum(tokens / rate(batching, L, seed) for L, tokens in mixes[seed][batching]["tokens"].items())

    def own(b, L, s):  # this seed's measurement
        return measured[(b, L)][s]["tokens_per_second"]

    def fastest(b, L, s):  # the fastest seed's: the least slowed by other processes on a shared machine
        return max(r["tokens_per_second"] for r in measured[(b, L)].values())

    per_seed = {}
    for seed in seeds:
        m = mixes[seed]
        t_dd, t_cc = epoch(seed, "decompose", own), epoch(seed, "pack", own)
        f_dd, f_cc = epoch(seed, "decompose", fastest), epoch(seed, "pack", fastest)
        cpu_dd = sum(tok / tps * measured[("decompose", L)][seed]["cpu_seconds"] for L, tok in m["decompose"]["tokens"].items())
        cpu_cc = sum(tok / tps * measured[("pack", L)][seed]["cpu_seconds"] for L, tok in m["pack"]["tokens"].items())
        n_dd, n_cc = m["decompose"]["tokens_total"], m["pack"]["tokens_total"]
        per_seed[seed] = {
            "epoch_seconds_decompose": round(t_dd, 1), "epoch_seconds_pack": round(t_cc, 1),
            "epoch_time_ratio_pack_over_decompose": round(t_cc / t_dd, 3),
            "epoch_tokens_per_second_ratio": round((n_dd / t_dd) / (n_cc / t_cc), 3),
            "epoch_time_ratio_fastest": round(f_cc / f_dd, 3),
            "epoch_tokens_per_second_ratio_fastest": round((n_dd / f_dd) / (n_cc / f_cc), 3),
            "epoch_cpu_seconds_ratio_pack_over_decompose": round(cpu_cc / cpu_dd, 3),
            "epoch_tokens_per_cpu_second_ratio": round((n_dd / cpu_dd) / (n_cc / cpu_cc), 3),
            "attn_flops_ratio_pack_over_decompose": round(m["pack"]["attn_flops"] / m["decompose"]["attn_flops"], 3),
            "attn_flops_per_token_ratio": round((m["pack"]["attn_flops"] / n_cc) / (m["decompose"]["attn_flops"] / n_dd), 3),
            "epoch_tokens_decompose": n_dd, "epoch_tokens_pack": n_cc,
        }

    def over_seeds(key: str) -> dict:
        return _stats([per_seed[s][key] for s in seeds])

    points = sorted(measured, key=lambda bl: (bl[0] != "pack", -bl[1]))
    lengths = sorted({L for b, L in points if b == "decompose"})
    return {
        "measured_tokens_per_second": {f"{b}@{L}": _stats([r["tokens_per_second"] for r in measured[(b, L)].values()])
                                       for b, L in points},
        "measured_cpu_seconds_per_step": {f"{b}@{L}": _stats([r["cpu_seconds"] for r in measured[(b, L)].values()])
                                          for b, L in points},
        "epoch_share_of_tokens_decompose": {
            L: round(sum(mixes[s]["decompose"]["tokens"].get(L, 0) for s in seeds)
                     / sum(mixes[s]["decompose"]["tokens_total"] for s in seeds), 4) for L in lengths},
        "computed_epoch_seconds_decompose": over_seeds("epoch_seconds_decompose"),
        "computed_epoch_seconds_pack": over_seeds("epoch_seconds_pack"),
        "computed_epoch_time_ratio_pack_over_decompose": over_seeds("epoch_time_ratio_pack_over_decompose"),
        "computed_epoch_tokens_per_second_ratio": over_seeds("epoch_tokens_per_second_ratio"),
        "computed_epoch_time_ratio_fastest": over_seeds("epoch_time_ratio_fastest"),
        "computed_epoch_tokens_per_second_ratio_fastest": over_seeds("epoch_tokens_per_second_ratio_fastest"),
        "computed_epoch_tokens_per_cpu_second_ratio": over_seeds("epoch_tokens_per_cpu_second_ratio"),
        "exact_attn_flops_ratio_pack_over_decompose": over_seeds("attn_flops_ratio_pack_over_decompose"),
        "exact_attn_flops_per_token_ratio": over_seeds("attn_flops_per_token_ratio"),
        "epoch_tokens": {"decompose": over_seeds("epoch_tokens_decompose"), "pack": over_seeds("epoch_tokens_pack")},
        "per_seed": per_seed,
        "labels": "measured = one timed optimizer step per (length, seed); computed = epoch time predicted from "
                  "the measured per-length throughput and the exact epoch token mix (not a timed epoch): each "
                  "seed's with its own measurements, and _fastest with the fastest seed's at each length; exact = "
                  "counted from the data. Ratios > 1 favour decomposition. No loss compared.",
    }


def _resummarize(path: Path) -> dict:
    """The summary of an earlier output, recomputed from its run, epoch_mix and step lines."""
    mixes, measured, run, old = {}, {}, {}, {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "run" in row:
            run = row["run"]
        elif "epoch_mix" in row:
            mix = row["epoch_mix"]
            mixes[mix["seed"]] = {b: {**mix[b], "tokens": {int(L): n for L, n in mix[b]["tokens"].items()}}
                                  for b in ("decompose", "pack")}
        elif "step" in row:
            st = row["step"]
            measured.setdefault((st["batching"], st["length"]), {})[st["seed"]] = st
        elif "summary" in row and "recomputed_from" not in row["summary"]:
            old = row["summary"]
    summary = _summary(mixes, measured, sorted(mixes), run["tokens_per_step"])
    summary.update({"recomputed_from": str(path), "wall_seconds": old.get("wall_seconds"),
                    "load_average_end": old.get("load_average_end"), "notes": run.get("notes", [])})
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny random model (byte tokens, max length 128)")
    p.add_argument("--source", default="default", help="default (one document per book) or default:chapters")
    p.add_argument("--max-len", type=int, default=None, help="longest bucket and concat-and-chunk row (4096; tiny 128)")
    p.add_argument("--min-len", type=int, default=None, help="shortest bucket (64; tiny 16)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: max-len (tiny: 4 x max-len)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--note", action="append", default=[], help="a line for the output's notes (e.g. who else ran)")
    p.add_argument("--summarize", type=Path, default=None,
                   help="print the summary of an earlier output (its epoch_mix and step lines) again, measuring nothing")
    args = p.parse_args(argv)
    if args.summarize:
        print(json.dumps({"summary": _resummarize(args.summarize)}))
        return 0
    max_len = args.max_len or (128 if args.tiny else 4096)
    min_len = args.min_len or (16 if args.tiny else 64)
    tps = args.tokens_per_step or (4 * max_len if args.tiny else max_len)
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()

    from longctx.data.decompose import attention_flops
    from longctx.recipes import schema
    from longctx.train.build import build, build_data
    from longctx.train.trainer import train_step

    out = Path(mkdtemp(prefix="longctx-dd-"))
    if args.tiny:
        base = RECIPES / "tiny.yaml"
        common = ["data.max_documents=null", f"model.config.max_position_embeddings={max_len}", "run.threads=0"]
        model_name = "tiny (random init, byte tokens)"
    else:
        base = RECIPES / "quickstart.yaml"
        common = ["model.rope.type=keep", "~model.rope.factor", "model.max_seq_len=null", "train.export=false",
                  "log.wandb=false", "eval.tasks=[]", "~eval.lengths", "~eval.depths", "~eval.native_rope"]
        model_name = "SmolLM2-135M-Instruct"
    common += [f"data.source={args.source}", f"data.eval_fraction={args.eval_fraction}", "eval.every=0",
               "train.max_steps=100000", "train.warmup_steps=1", "train.checkpoint_every=0", f"run.dir={out / 'run'}"]
    decompose = ["data.batching=decompose", f"data.max_len={max_len}", f"data.min_len={min_len}",
                 f"data.tokens_per_step={tps}"]
    pack = ["data.batching=pack", f"data.seq_len={max_len}", f"train.batch_size={tps // max_len}", "~data.min_len",
            "~data.max_len", "~data.tokens_per_step"] + ([] if args.tiny else ["~data.curriculum"])

    def recipe(seed: int, extra: list[str]):
        return schema.load(base, common + [f"run.seed={seed}"] + extra)

    first = recipe(seeds[0], decompose + ["data.curriculum=grow_p2"])
    model_dir = None if args.tiny else _model_dir(first)
    print(json.dumps({"run": {
        "command": shlex.join(["python", "-m", "longctx.bench.data_decomposition",
                              *(sys.argv[1:] if argv is None else argv)]),
        "commit": _commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": _machine(),
        "model": model_name, "dtype": first.run.dtype, "memory_policy": first.memory.policy, "source": args.source,
        "max_len": max_len, "min_len": min_len, "tokens_per_step": tps, "seeds": seeds,
        "eval_fraction": args.eval_fraction, "load_average": [round(x, 2) for x in os.getloadavg()],
        "notes": args.note}}), flush=True)

    # --- exact: each seed's epoch, through the trainer's data path ------------------------------------
    run = build(first)  # the model, optimizer and data exactly as `longctx train` builds them
    cfg = run.model.config
    per_token_layer = cfg.num_heads * cfg.head_dim * cfg.num_layers  # attention_flops' H*d, times the layers
    vocab_size = cfg.vocab_size
    mixes = {}
    for seed in seeds:
        dd = build_data(recipe(seed, decompose + ["data.curriculum=grow_p2"]), model_dir, run.mesh, vocab_size)[0]
        cc = build_data(recipe(seed, pack), model_dir, run.mesh, vocab_size)[0]
        b, sampler = dd.buckets, dd.sampler
        dd_tokens = {L: n * tps for L, n in sampler.batches_per_epoch.items()}
        dd_rows = {L: n * (tps // L) for L, n in sampler.batches_per_epoch.items()}
        cc_rows = len(cc.rows.train_ids) // cc.batch_size * cc.batch_size  # whole steps
        mix = {
            "decompose": {"tokens": dd_tokens, "steps": dict(sampler.batches_per_epoch), "bucket_pieces": b.sizes,
                          "tokens_total": sum(dd_tokens.values()),
                          "unused_pieces_tokens": b.transitions_kept - sum(dd_tokens.values()),
                          "dropped_short_tokens": b.transitions_dropped, "transitions_total": b.transitions_total,
                          "attn_flops": attention_flops(dd_rows, per_token_layer)},
            "pack": {"tokens": {max_len: cc_rows * max_len}, "steps": {max_len: cc_rows // cc.batch_size},
                     "tokens_total": cc_rows * max_len, "rows_in_stream": len(cc.rows.train_ids),
                     "attn_flops": attention_flops({max_len: cc_rows}, per_token_layer)},
        }
        mixes[seed] = mix
        print(json.dumps({"epoch_mix": {"seed": seed, **mix}}), flush=True)

    # --- measured: one step per (seed, length) -----------------------------------------------------------
    lengths = sorted({L for m in mixes.values() for L in m["decompose"]["tokens"]}, reverse=True)
    points = [("pack", max_len)] + [("decompose", L) for L in lengths]

    def data_for(seed: int, batching: str, L: int):
        extra = pack if batching == "pack" else decompose + ["data.curriculum=fixed", f"data.fixed_len={L}"]
        return build_data(recipe(seed, extra), model_dir, run.mesh, vocab_size)[0]

    def timed_step(data) -> dict:
        run.data = data
        if hasattr(data, "sampler"):  # the epoch's plan, made once per epoch in training, not in the timed step
            data.sampler.length_at(0)
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(sys.stderr):
            rec = train_step(run, 0)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"step_tokens": rec["step_tokens"], "rows": rec["rows"], "seq_len": rec["seq_len"],
                "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                "tokens_per_second": round(rec["step_tokens"] / seconds, 3),
                "load_average_1m_before": round(load, 2), "loss": round(rec["loss"], 4)}

    run.model.train()
    warm = timed_step(data_for(seeds[0], "pack", max_len))
    print(json.dumps({"warmup": {"batching": "pack", "note": "untimed in the figures", **warm}}), flush=True)
    measured: dict[tuple[str, int], dict[int, dict]] = {pt: {} for pt in points}
    for seed in seeds:
        for batching, L in points:
            if L not in mixes[seed][batching]["tokens"]:  # this seed's bucket holds less than a step: not trained
                continue
            row = timed_step(data_for(seed, batching, L))
            assert row["seq_len"] == L and row["step_tokens"] == tps, row
            measured[(batching, L)][seed] = row
            print(json.dumps({"step": {"batching": batching, "length": L, "seed": seed, **row}}), flush=True)

    # --- computed from the measurements ------------------------------------------------------------------
    summary = _summary(mixes, measured, seeds, tps)
    summary.update({"wall_seconds": round(time.perf_counter() - t_start, 1),
                    "load_average_end": [round(x, 2) for x in os.getloadavg()], "notes": args.note})
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
