"""The longest SmolLM2-135M context that trains one step on this machine: transformers with
activation checkpointing vs longctx (CCE, blocks recomputed in 4K-token chunks, segments of
`SEGMENT` blocks recomputed from their input), predicted by the memory model behind `longctx
plan` and checked against measured peak RSS.

Each case is a fresh subprocess running a warm-up step at 256 tokens (so AdamW's states exist,
as in every later step) and then one optimizer step (forward, backward, AdamW) at one length,
batch 1, fp32, optionally with the model cut to its first `layers` blocks (so long lengths take
minutes, not hours); it prints the measured peak RSS next to the prediction for the same
model, length and process baseline. The baseline (`runtime_bytes`) is the RSS right before the
step less the parameters and AdamW's states counted from the live tensors (which the row also
gives next to the model's count): the interpreter, torch, transformers, their scratch buffers and
pages the allocator kept from the warm-up (~110 MB beyond the tensors on this machine). The peak
is the step's: the kernel's peak-RSS mark (VmHWM) is reset right before it, so loading the full
model before cutting it does not count.

Cases run with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_): by default the
threshold grows with each freed block up to 32 MiB, so the [tokens, hidden] tensors of an 8K
step come from the heap, where freed blocks fragment it and peak RSS measures the allocator, not
the tensors (6.0 GB vs 3.3 GB for the same 8K step). It plays the part of PyTorch's CUDA caching
allocator with expandable segments; both implementations run under it.

  python -m longctx.bench.max_context [--cases hf:4096:30,longctx:8192:30,longctx:8192:4:2] [--budget-gib 24]
  python -m longctx.bench.max_context --predict-only bench/results/cpu-max_context.jsonl   # predictions only

The summary also gives the predicted longest step as each technique is added in turn
(`predicted_longest_by_technique`: transformers + checkpointing, + CCE, + chunked recompute,
+ segments, + the final norm and loss in tiles, + attention by query tiles), so each one's
share shows.

A case is impl:length:blocks[:blocks per recomputed segment, longctx only, default SEGMENT].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

GiB = 1 << 30
MMAP_THRESHOLD = 1 << 20
# longctx's blocks per recomputed segment (memory.recompute_num_layers) for the 30-block model:
# 6 segments of 5 or 5 of 6 both leave 10 block inputs live at the peak; 6 recomputes one segment less.
SEGMENT = 6


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it, so the measured
    peak is the step's, not model loading's (the full model is loaded before it is cut)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _shape(layers: int):
    from longctx.models.hf import load_model_folder
    from longctx.train.build import default_model_dir, model_shape

    cfg = load_model_folder(default_model_dir())
    return model_shape(cfg.replace(num_layers=layers))


def _predict(impl: str, seq_len: int, layers: int, runtime: float, per_segment: int = SEGMENT):
    from longctx.memory.estimate import Setting, estimate, hf_checkpointing_estimate

    shape = _shape(layers)
    if impl == "hf":
        return hf_checkpointing_estimate(shape, seq_len, autocast=False, runtime_bytes=runtime)
    return estimate(shape, Setting(seq_len=seq_len, autocast=False, policy="full", loss="cce", gpus_per_node=1,
                                   sharding="none", runtime_bytes=runtime, recompute_num_layers=per_segment,
                                   optimizer_foreach=False))  # as its AdamW below


def _case(impl: str, seq_len: int, layers: int, per_segment: int = SEGMENT) -> dict:
    import torch
    from longctx.train.build import default_model_dir

    folder = default_model_dir()
    tokens = torch.randint(0, 49152, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if impl == "hf":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing

        def loss_of(x, y):
            return model(x, labels=y, shift_labels=y).loss
    else:
        from longctx.memory import offload
        from longctx.parallel.mesh import Mesh
        from longctx.recipes import schema
        from longctx.train.build import build_model

        recipe = schema.load(None, ["memory.policy=full", "loss.impl=cce"])
        model, _, _ = build_model(recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")))
        model.model.layers = model.model.layers[:layers]
        offload.segment(model, per_segment)  # what memory.recompute_num_layers does, on the cut model

        def loss_of(x, y):
            return model(x, labels=y) / y.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    # warm-up at 256 tokens: AdamW's states exist from here on, as in every step after the first
    loss_of(inputs[:, :256], labels[:, :256]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = _reset_peak()
    # the process baseline: what is resident before the step besides parameters and AdamW's states
    # (interpreter, libraries, their scratch and the allocator's retained pages after a step)
    state = list(model.parameters()) + [t for st in optimizer.state.values() for t in st.values()]
    state_bytes = sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))
    runtime = before - state_bytes
    t0 = time.perf_counter()
    loss = loss_of(inputs, labels)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    pred = _predict(impl, seq_len, layers, runtime, per_segment)
    return {
        "impl": "transformers_ckpt" if impl == "hf" else "longctx_cce_recompute", "seq_len": seq_len,
        "layers": layers, **({} if impl == "hf" else {"recompute_num_layers": per_segment}), "dtype": "fp32", "measured_peak_bytes": peak, "predicted_peak_bytes": int(pred.total),
        "prediction_error": round(pred.total / peak - 1, 4), "runtime_bytes": runtime,
        "rss_before_step_bytes": before, "params_optimizer_bytes": state_bytes,
        "predicted_params_optimizer_bytes": int(pred.terms["params"] + pred.terms["optimizer"]),
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "predicted_terms_gib": {k: round(v / GiB, 3) for k, v in pred.terms.items()},
        "predicted_peak_phase": pred.peak_phase,
        "step_seconds": round(seconds, 1), "loss": round(loss.item(), 4), "threads": torch.get_num_threads(),
    }


# Each adds one technique to the one before, from transformers' path (checkpointing whole blocks,
# N x V logits) to longctx's (memory/estimate.py Setting fields; fp32, one process).
TECHNIQUES = [
    ("cce", dict(loss="cce", recompute_chunk_tokens=None, recompute_num_layers=1, loss_tile_tokens=None,
                 attention_by_rows=False)),
    ("chunked_recompute", dict(recompute_chunk_tokens=4096)),
    ("segments", dict(recompute_num_layers=SEGMENT)),
    ("tiled_head", dict(loss_tile_tokens=4096)),
    ("attention_by_query_tiles", dict(attention_by_rows=True)),
]
NOT_MODELLED = {
    "swap": "on a CPU the host tier is the same memory: MEMO's swap moves nothing out of it",
    "transformers_checkpoint_offload": "transformers' CPU offload of checkpoints moves them to the same memory on a "
                                       "CPU: its longest step is transformers + checkpointing's",
}


def longest_by_technique(budget: float, hf_base: float, our_base: float, layers: int = 30) -> dict:
    """The predicted longest step in `budget` for transformers + checkpointing, then adding each of
    TECHNIQUES in turn (the last is longctx as `_predict` runs it)."""
    from longctx.memory.estimate import Setting, estimate, hf_checkpointing_estimate, longest_fitting

    shape = _shape(layers)
    out = {"transformers_ckpt": longest_fitting(
        lambda n: hf_checkpointing_estimate(shape, n, autocast=False, runtime_bytes=hf_base), budget)}
    setting = dict(autocast=False, policy="full", gpus_per_node=1, sharding="none", runtime_bytes=our_base,
                   optimizer_foreach=False)
    for name, extra in TECHNIQUES:
        setting.update(extra)
        out[f"+{name}"] = longest_fitting(lambda n, s=dict(setting): estimate(shape, Setting(seq_len=n, **s)), budget)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="hf:2048:30,hf:4096:30,hf:8192:30,longctx:4096:30,longctx:8192:30,longctx:8192:4:2,longctx:16384:1,longctx:65536:1")
    p.add_argument("--budget-gib", type=float, default=24.0, help="memory of the machine to fit in")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--predict-only", metavar="FILE", help="run no case: the summary's predictions, with the process "
                                                           "baselines (runtime_bytes) of the rows in FILE (an earlier output)")
    args = p.parse_args(argv)
    if args.case:
        impl, seq_len, layers, *per_segment = args.case.split(":")
        print(json.dumps(_case(impl, int(seq_len), int(layers), *map(int, per_segment))))
        return 0
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))}
    if args.predict_only:
        with open(args.predict_only) as f:
            earlier = [json.loads(x) for x in f if x.strip() and not x.startswith('{"summary"')]
        rows = [{"impl": r["impl"], "runtime_bytes": r["runtime_bytes"]} for r in earlier if "runtime_bytes" in r]
    for case in ([] if args.predict_only else args.cases.split(",")):
        out = subprocess.run([sys.executable, "-m", "longctx.bench.max_context", "--case", case],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            row = {"case": case, "error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        row["malloc_mmap_threshold"] = int(env["MALLOC_MMAP_THRESHOLD_"])
        row["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
        rows.append(row)
        print(json.dumps(row), flush=True)
    from longctx.memory.estimate import longest_fitting

    def baseline(impl: str) -> float:  # the measured process baseline of that implementation
        return max((r["runtime_bytes"] for r in rows if r.get("impl", "").startswith(impl)), default=0.6 * GiB)

    budget = args.budget_gib * GiB
    hf_base, our_base = baseline("transformers"), baseline("longctx")
    hf = longest_fitting(lambda n: _predict("hf", n, 30, hf_base), budget, lo=1024, step=1024)
    ours = longest_fitting(lambda n: _predict("longctx", n, 30, our_base), budget, lo=1024, step=1024)
    errors = [abs(r["prediction_error"]) for r in rows if "prediction_error" in r]
    ratio = round(ours / hf, 2) if hf else None
    print(json.dumps({"summary": {
        "budget_gib": args.budget_gib, "predicted_longest_transformers_ckpt": hf, "predicted_longest_longctx": ours,
        "length_ratio": ratio, "predicted_longest_ratio": ratio,
        "predicted_longest_by_technique": longest_by_technique(budget, hf_base, our_base),
        "not_modelled": NOT_MODELLED,
        "max_abs_prediction_error": max(errors, default=None), "max_prediction_error": max(errors, default=None),
        "measured_cases": len(errors), "predict_only": bool(args.predict_only),
    }}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
