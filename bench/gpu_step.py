"""One optimizer step of a Llama-3.1-8B-shaped model at growing lengths until it runs out of
memory (or time): the measured peak against `longctx plan`'s prediction for the same setting.

The model is built by the trainer's own code (`train/build.py build_model` from a recipe:
`model.path=null` with Llama-3.1-8B's shape, hidden 4096, intermediate 14336, 32/8 heads of 128,
vocab 128256, rope theta 500000, cut to `--layers` blocks, random init), bf16 autocast over fp32
master weights, CCE loss, MEMO (`memory.policy=memo`, alpha auto, host tier, 2 resident blocks,
4K-token recompute chunks), AdamW from `train/optim.py`, and each step is the trainer's
`train/trainer.py train_step` on one random row of the length. The recipe fixes MEMO's hardware
figures (`memory.link_gbps`, `memory.device_tflops`, `memory.host_memory_gib`), so the trainer's
planner and the prediction see the same ones. The prediction is `train/plan_report.py plan(...)`
(what `longctx plan` prints) for this recipe at that length, one GPU, no sharding; its runtime
term is measured like bench/max_context.py's: allocated bytes before the step less parameters,
AdamW states and MEMO's staging buffers (which the plan counts itself). Where `plan` lowers alpha
below `auto` because auto would overflow the GPU (binding `device_memory`), the run uses that alpha,
as the plan tells a user to write it in the recipe.

Per length a warm step runs first when the time allows (it grows the pinned host slab and the
staging buffers); the measured step follows. Peak = `torch.cuda.max_memory_allocated` over the
step, also split at the optimizer step (a step pre-hook). Target (issue 15): every measured
peak within 10% of the prediction.

  python -m longctx.bench.gpu_step                  # CUDA: 4 blocks, 8K, 16K, ... until OOM or --time-budget
  python -m longctx.bench.gpu_step --plan-only      # the predictions only (any machine)
  python -m longctx.bench.gpu_step --dry-run        # CPU: a tiny model, 2 lengths, peak RSS (no target)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from longctx.bench import machine

# Before torch is imported: the allocator setting long-context runs use (whole steps fragment a
# fixed-segment cache; the memory model assumes expandable segments).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

GiB = 1 << 30
TARGET_ERROR = 0.10
LLAMA31_8B = {"family": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001}
TINY = {"family": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2}


def recipe_overrides(args, device: str) -> list[str]:
    shape = TINY if args.dry_run else LLAMA31_8B
    return [f"model.config.{k}={v}" for k, v in shape.items()] + [
        "model.path=null", "model.tokenizer=bytes", f"model.config.num_layers={args.layers}",
        "model.rope.theta=500000", f"model.max_seq_len={max(args.lengths + [2048])}",  # >= data.max_len
        "run.dtype=bf16", f"run.device={device}", "log.wandb=false",
        "memory.policy=memo", "memory.alpha=auto", "memory.tier=host", f"memory.resident_layers={args.resident}",
        f"memory.recompute_chunk_tokens={args.chunk_tokens}", f"memory.link_gbps={args.link_gbps}",
        f"memory.device_tflops={args.device_tflops}", f"memory.host_memory_gib={args.host_gib}",
        "loss.impl=cce", "parallel.attention_kernel=auto", "train.lr=1e-5", "train.max_steps=1000",
    ]


def predict(recipe, seq_len: int, device_bytes: float, runtime_bytes: float, alpha=None, **inputs) -> dict:
    """`longctx plan` for this recipe at `seq_len` on one GPU (optionally at a fixed alpha; `inputs`
    override the recipe's planning inputs, train/build.py plan_inputs)."""
    from longctx.train.build import plan_inputs
    from longctx.train.plan_report import plan

    shape, r = plan_inputs(recipe)
    r = dict(r, **inputs)
    if alpha is not None:
        r = dict(r, alpha=alpha)
    m = recipe.memory
    return plan(shape, r, gpus=1, gpu_mem=device_bytes, host_mem=m.host_memory_gib * GiB, gpus_per_node=1,
                sharding="none", runtime_bytes=runtime_bytes, tflops=m.device_tflops, link_gbps=m.link_gbps,
                seq_len=seq_len)


class RandomRows:
    """Stands in for the trainer's data source: one row of `seq_len` random token ids per step."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.seq_len = vocab, 0

    def step_batch(self, step: int):
        import torch

        tokens = torch.randint(0, self.vocab, (1, self.seq_len + 1), generator=torch.Generator().manual_seed(step))
        return tokens[:, :-1], tokens[:, 1:], 1


class Meter:
    """Peak memory of a step, split at the optimizer step: CUDA's allocator peak, or on CPU the
    kernel's peak-RSS mark (VmHWM, reset before the step where the kernel allows it)."""

    def __init__(self, device, optimizer) -> None:
        self.device, self.active, self.before_optimizer = device, False, None
        optimizer.register_step_pre_hook(self._pre_step)

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def current(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # the peak then includes earlier steps: fine for a dry run

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.active:
            self.before_optimizer = self.peak()
            self.reset()

    def start(self) -> None:
        self.reset()
        self.active, self.before_optimizer = True, None

    def stop(self) -> tuple[int, int | None]:
        """(peak before the optimizer step, peak during it)."""
        self.active = False
        after = self.peak()
        return (after, None) if self.before_optimizer is None else (self.before_optimizer, after)


def state_bytes(model, optimizer, pool) -> tuple[int, int]:
    """(parameters + AdamW states, MEMO's device staging buffers) as allocated now."""
    import torch

    state = list(model.parameters()) + [t for st in optimizer.state.values() for t in st.values()
                                        if isinstance(t, torch.Tensor)]
    staging = [b for b in (pool.staging if pool is not None else []) if b is not None]
    return (sum(t.numel() * t.element_size() for t in state if t.device.type == model.output_weight.device.type),
            sum(b.numel() * b.element_size() for b in staging))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4, help="Llama-3.1-8B blocks kept (the plan is told the same)")
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072,262144,524288,1048576")
    p.add_argument("--resident", type=int, default=2, help="memory.resident_layers")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="memory.recompute_chunk_tokens")
    p.add_argument("--link-gbps", type=float, default=25.0, help="memory.link_gbps (the recipe's and the plan's)")
    p.add_argument("--device-tflops", type=float, default=300.0, help="memory.device_tflops")
    p.add_argument("--host-gib", type=float, default=16.0, help="memory.host_memory_gib (pinned host memory bound)")
    p.add_argument("--warmup-len", type=int, default=2048, help="the first step's length (creates AdamW's states)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no length is started that would pass it")
    p.add_argument("--plan-only", action="store_true", help="print the predictions, run nothing")
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, 256 and 512 tokens")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        args.layers, args.lengths, args.resident, args.chunk_tokens = 3, "256,512", 1, 128
        # a slow link, so alpha is below 1 and differs per length (the planner is exercised)
        args.link_gbps, args.device_tflops, args.host_gib, args.warmup_len = 0.5, 0.05, 1.0, 64
    args.lengths = [int(n) for n in args.lengths.split(",")]

    import torch
    from longctx.recipes import schema

    cuda = not args.dry_run and not args.plan_only
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_step: no CUDA device (use --dry-run on CPU, or --plan-only)")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    elif args.plan_only:
        device_bytes = 141e9  # an H200's, for a look at the GPU run's predictions
    else:
        device_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    recipe = schema.load(None, recipe_overrides(args, device.type))

    if args.plan_only:
        for n in args.lengths:
            pr = predict(recipe, n, device_bytes, 0.0)
            print(json.dumps({"seq_len": n, "layers": args.layers, "predicted_peak_bytes": int(pr["total_bytes"]),
                              "predicted_peak_phase": pr["peak_phase"], "alpha": pr["alpha"],
                              "alpha_binding": pr["alpha_binding"], "fits": pr["fits"],
                              "planned_step_seconds": round(pr["step_seconds"], 2),
                              "terms_gib": {k: round(v / GiB, 2) for k, v in pr["terms_bytes"].items()}}))
        print(json.dumps({"summary": {"plan_only": True, "device_bytes": device_bytes,
                                      "plan_longest_seq_len": predict(recipe, args.lengths[0], device_bytes, 0.0)[
                                          "longest_seq_len"]}}))
        return 0

    from longctx.parallel.mesh import Mesh
    from longctx.train.build import Run, build_model
    from longctx.train.optim import build_optimizer, build_scheduler
    from longctx.train.trainer import train_step

    torch.manual_seed(recipe.run.seed)
    mesh = Mesh(0, 1, 0, 1, None, device)
    model, _, _ = build_model(recipe, mesh)
    t = recipe.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    data = RandomRows(model.config.vocab_size)
    run = Run(recipe=recipe, mesh=mesh, model=model, optimizer=optimizer,
              scheduler=build_scheduler(optimizer, t.max_steps, t.warmup_steps, t.min_lr_ratio), data=data,
              eval_data=None, run_dir=recipe.run_dir, tokenizer_dir=None, autocast_dtype=torch.bfloat16)
    planner, meter = model.memory, Meter(device, optimizer)
    pool = planner.pool if planner is not None else None
    model.train()
    step = 0

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_step(seq_len: int) -> tuple[dict, float]:
        nonlocal step
        data.seq_len = seq_len
        sync()
        t0 = time.perf_counter()
        out = train_step(run, step)
        sync()
        step += 1
        return out, time.perf_counter() - t0

    # Two short steps: AdamW's states exist from the first on, as in every later step (and the
    # kernels are compiled); the second's time is what the first length's time is scaled from.
    _, first_seconds = one_step(args.warmup_len)
    _, seconds = one_step(args.warmup_len)
    print(json.dumps({"case": "warmup", "seq_len": args.warmup_len, "first_step_seconds": round(first_seconds, 3),
                      "step_seconds": round(seconds, 3), "setup_seconds": round(time.perf_counter() - start, 1),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)

    rows, oom_at, stopped, failed = [], None, None, None

    def terminated(signum, frame):  # the suite's `timeout`: end the length, still print the summary
        raise TimeoutError("terminated (SIGTERM: the suite's time limit)")

    signal.signal(signal.SIGTERM, terminated)
    last = (predict(recipe, args.warmup_len, device_bytes, 0.0)["step_seconds"], seconds)
    for n in args.lengths:
        pr0 = predict(recipe, n, device_bytes, 0.0)
        # the time this length will take: the last measured step scaled by the plan's step model
        guess = last[1] * pr0["step_seconds"] / last[0]
        left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - start)
        # a length's first step also grows the pinned host slab: allow twice the scaled time
        if left is not None and guess * 2 + 10 > left:
            stopped = f"time budget: {n} tokens would take ~{guess:.0f} s per step, {left:.0f} s left"
            print(json.dumps({"seq_len": n, "skipped": stopped}), flush=True)
            break
        warm = left is None or guess * 4 + 15 <= left
        alpha = pr0["alpha"] if pr0["alpha_binding"] == "device_memory" else None
        if planner is not None:
            planner.alpha = alpha  # None = auto; else the value `longctx plan` says to write in the recipe
        row = {"seq_len": n, "layers": args.layers, "warm": warm,
               "alpha_source": "auto" if alpha is None else "plan: auto overflows the GPU, alpha lowered to fit"}
        try:
            if warm:
                one_step(n)
            params_opt, staging = state_bytes(model, optimizer, pool)
            runtime = meter.current() - params_opt - staging
            pred = predict(recipe, n, device_bytes, runtime, alpha)
            meter.start()
            out, step_seconds = one_step(n)
            peak_fwd_bwd, peak_opt = meter.stop()
        except (RuntimeError, TimeoutError) as e:  # OOM (or a library's allocation failure), SIGTERM
            meter.active = False
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            if oom:
                oom_at = n
            elif isinstance(e, TimeoutError):
                stopped = f"{n} tokens: {e}"
            else:
                failed = stopped = f"{n} tokens: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row.update(oom=oom, peak_before_failure_bytes=meter.peak(),
                       predicted_peak_bytes=int(pr0["total_bytes"]), predicted_fits=pr0["fits"],
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(json.dumps(row), flush=True)
            break
        peak = max(peak_fwd_bwd, peak_opt or 0)
        row.update({
            "step_seconds": round(step_seconds, 3), "tokens_per_second": round(n / step_seconds, 1),
            "loss": round(out["loss"], 4), "measured_peak_bytes": peak,
            "measured_peak_fwd_bwd_bytes": peak_fwd_bwd, "measured_peak_optimizer_bytes": peak_opt,
            "predicted_peak_bytes": int(pred["total_bytes"]), "prediction_error": round(pred["total_bytes"] / peak - 1, 4),
            "predicted_peak_phase": pred["peak_phase"], "predicted_fits": pred["fits"],
            "predicted_terms_gib": {k: round(v / GiB, 3) for k, v in pred["terms_bytes"].items()},
            "alpha_plan": round(pred["alpha"], 4), "alpha_binding": pred["alpha_binding"],
            "alpha_run": round(planner.last.alpha, 4) if planner is not None and planner.last else None,
            "runtime_bytes": runtime, "params_optimizer_bytes": params_opt, "staging_bytes_before": staging,
            "planned_step_seconds": round(pred["step_seconds"], 3),
        })
        if cuda:
            row["reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
        if pool is not None:
            row["host_pool_bytes"] = pool.capacity_bytes
            row["host_bytes_last_step"] = pool.last_step_bytes
        rows.append(row)
        last = (pred["step_seconds"], step_seconds)
        print(json.dumps(row), flush=True)

    errors = [abs(r["prediction_error"]) for r in rows]
    worst = max(errors, default=None)
    summary = {
        "device": str(device), "layers": args.layers, "dry_run": args.dry_run,
        "model": "Llama-3.1-8B shape, random init" if not args.dry_run else "tiny llama, random init",
        "params": sum(p.numel() for p in model.parameters()),
        "lengths_measured": [r["seq_len"] for r in rows], "longest_measured": max((r["seq_len"] for r in rows), default=0),
        "oom_at": oom_at, "stopped": stopped,
        "plan_longest_seq_len": predict(recipe, args.lengths[0], device_bytes, rows[0]["runtime_bytes"] if rows else 0.0)[
            "longest_seq_len"],
        "prediction_error": {r["seq_len"]: r["prediction_error"] for r in rows},
        "max_abs_prediction_error": worst,
        "step_seconds": {r["seq_len"]: r["step_seconds"] for r in rows},
        "targets": {"step_peak_within_10pct": {
            "target": f"every measured step peak within {TARGET_ERROR:.0%} of longctx plan's prediction",
            "value": worst, "limit": TARGET_ERROR, "pass": worst is not None and worst <= TARGET_ERROR}},
        "machine": machine(device),
    }
    print(json.dumps({"summary": summary}))
    return 1 if failed else 0  # running out of memory is this benchmark's end, not a failure


if __name__ == "__main__":
    raise SystemExit(main())
