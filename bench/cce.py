"""Loss-head benchmark: Cut Cross-Entropy vs the naive head (and, on GPU, Liger's fused linear CE
and Apple's `cut-cross-entropy` package).

Each implementation runs in a fresh subprocess. `peak_bytes` is the head's peak memory above its
inputs and its gradient outputs (dHidden, dWeight): on CUDA the allocator's peak minus those; on
CPU the process's peak RSS minus the RSS once inputs exist, minus the gradient bytes. Inputs look
like a trained model's (a few large logits per row, apple/ml-cross-entropy#15), not random noise.
Implementations: ours through `kernels.loss.linear_cross_entropy(impl=)` (reference = the naive
head, cce = the Triton kernels on CUDA, else the chunked torch path), `liger` =
`liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`, `apple` =
`cut_cross_entropy.linear_cross_entropy(e, c, targets)` (Wijmans et al.'s own kernels, defaults).

The summary's `targets` (issue 15), with pass/fail computed from this run: our CCE (cce_triton on
CUDA) takes no longer than Liger, and its peak is at most 1/20 of the naive head's.

  python -m longctx.bench.cce                     # CPU default: SmolLM2's head, N=8192, V=49152, D=576, fp32
  python -m longctx.bench.cce --device cuda --n 65536 --vocab 128256 --hidden 4096 --dtype bf16 --impls reference,cce,liger,apple
  python -m longctx.bench.cce --dry-run           # CPU, tiny shapes: the code path of the GPU run, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GPU_ONLY_IMPLS = ("liger", "apple")  # Triton kernels of other packages: CUDA only


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _inputs(n, vocab, hidden, dtype, device):
    import torch

    # On CUDA the draws are made there: GPU-sized inputs take seconds to draw on the CPU.
    gen_device = "cuda" if device == "cuda" else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(0)
    h = torch.randn(n, hidden, generator=g, device=gen_device).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=gen_device) * hidden**-0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=g, device=gen_device).to(device)
    # Push each hidden state toward its label's row so the target logit is ~9 above the crowd:
    # a loss near 2.5 nats with a peaked softmax, like a trained LM's head.
    target_rows = w[labels].float()
    h = (h.float() + 9 * target_rows / target_rows.norm(dim=1, keepdim=True)).to(dtype)
    return h.contiguous().requires_grad_(), w.requires_grad_(), labels


def _case(impl: str, n: int, vocab: int, hidden: int, dtype_name: str, device: str, repeats: int,
          autotune: bool = False) -> dict:
    import resource

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    h, w, labels = _inputs(n, vocab, hidden, dtype, device)
    if impl == "reference":
        from longctx.kernels.loss import reference_linear_cross_entropy as fn
    elif impl == "liger":
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )

        def fn(hh, ww, yy):
            return liger_fused_linear_cross_entropy(hh, ww, yy)
    elif impl == "apple":
        from cut_cross_entropy import linear_cross_entropy as apple_linear_cross_entropy

        def fn(hh, ww, yy):  # (e [N, D], c [V, D], targets [N]); mean reduction, its default filtering
            return apple_linear_cross_entropy(hh, ww, yy)
    else:
        from longctx.kernels.loss import linear_cross_entropy

        def fn(hh, ww, yy):
            if autotune and _resolved(impl, device) == "cce_triton":  # the kernels' own autotuner
                from longctx.kernels.cce import linear_cross_entropy as triton_cce

                return triton_cce(hh, ww, yy, autotune=True)
            return linear_cross_entropy(hh, ww, yy, impl=impl)

    def once():
        loss = fn(h, w, labels)
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss, dh, dw

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    once()  # warm-up (kernel compilation / allocator)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    for _ in range(repeats):
        loss = dh = dw = None  # free the previous gradients first: they are not the head's memory
        loss, dh, dw = once()
        sync()
    seconds = (time.perf_counter() - t0) / repeats
    grad_bytes = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base - grad_bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base - grad_bytes
    resolved = _resolved(impl, device)
    blocks = {}
    if resolved == "cce_triton" and autotune:  # what the autotuner picked (timed in the warm-up call)
        from longctx.kernels.cce import tuned_choices

        blocks = {"tuned_blocks": {kind: list(picks.values()) for kind, picks in tuned_choices().items()}}
    elif resolved == "cce_triton":  # the tiles each kernel ran with: (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages)
        from longctx.kernels.cce import resolve_blocks

        blocks = {"blocks": resolve_blocks(dtype, torch.device(device))}
    return {"impl": impl, "resolved_impl": resolved, **blocks,
            "n_tokens": n, "vocab": vocab, "hidden": hidden, "dtype": dtype_name,
            "seconds_fwd_bwd": round(seconds, 4), "peak_bytes": int(max(peak, 0)), "loss": round(loss.item(), 5),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.processor() or platform.machine()}",
            "threads": torch.get_num_threads()}


def _resolved(impl: str, device: str) -> str:
    """What `impl` runs on this device (cce -> cce_triton on CUDA, cce_torch elsewhere)."""
    if impl in GPU_ONLY_IMPLS:
        return impl
    import torch
    from longctx.kernels.loss import resolve_impl

    return resolve_impl(impl, torch.device(device))


def machine(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda)
    return out


def targets(rows: dict) -> dict:
    """Issue 15's loss-head targets, computed from the rows (pass is False when a row is missing)."""
    ours = rows.get("cce_triton") or rows.get("cce")
    liger, naive = rows.get("liger"), rows.get("reference")

    def target(text, value, limit):
        ok = value is not None and limit is not None and value <= limit
        return {"target": text, "impl": ours and ours["resolved_impl"], "value": value, "limit": limit, "pass": ok}

    return {
        "cce_time_le_liger": target(
            "our CCE (cce_triton on CUDA) seconds_fwd_bwd <= Liger's",
            ours and ours["seconds_fwd_bwd"], liger and liger["seconds_fwd_bwd"]),
        "cce_peak_le_naive_over_20": target(
            "our CCE peak_bytes <= the naive head's / 20",
            ours and ours["peak_bytes"], naive and naive["peak_bytes"] / 20),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impls", default="reference,cce", help="reference, cce, cce_torch, cce_triton, liger, apple")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for all cases; later ones are skipped")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, N=256, V=1024, D=64, fp32, every impl (liger/apple report that they need CUDA)")
    p.add_argument("--autotune", action="store_true",
                   help="cce_triton: Triton's autotuner over kernels/cce.py CANDIDATES instead of the fixed tiles")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.n, args.vocab, args.hidden, args.dtype = "cpu", 256, 1024, 64, "fp32"
        args.impls, args.repeats = "reference,cce,liger,apple", 1
    if args.case:
        print(json.dumps(_case(args.case, args.n, args.vocab, args.hidden, args.dtype, args.device, args.repeats,
                               args.autotune)))
        return 0
    start = time.perf_counter()
    rows, errors = {}, []
    for impl in args.impls.split(","):
        left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - start)
        if impl in GPU_ONLY_IMPLS and args.device != "cuda":
            row = {"impl": impl, "skipped": f"{impl} runs Triton kernels on CUDA only (this run: {args.device})"}
        elif left is not None and left <= 5:
            row = {"impl": impl, "skipped": f"time budget of {args.time_budget:.0f} s spent"}
        else:
            cmd = [sys.executable, "-m", "longctx.bench.cce", "--case", impl, "--n", str(args.n), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
                   "--repeats", str(args.repeats), *(["--autotune"] if args.autotune else [])]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                out = None
            if out is None:
                row = {"impl": impl, "error": f"timed out after {left:.0f} s (time budget)"}
            elif out.returncode:
                row = {"impl": impl, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows[impl] = row
            if "error" in row:
                errors.append(impl)
        print(json.dumps(row), flush=True)
    summary = {"device": args.device, "n_tokens": args.n, "vocab": args.vocab, "hidden": args.hidden,
               "dtype": args.dtype, "dry_run": args.dry_run,
               "impls": {impl: {"resolved_impl": r["resolved_impl"], "seconds_fwd_bwd": r["seconds_fwd_bwd"],
                                "peak_bytes": r["peak_bytes"]} for impl, r in rows.items()}}
    naive = rows.get("reference")
    for impl, row in rows.items():
        if impl != "reference" and naive:
            key = "" if impl == "cce" else f"_{impl}"
            summary[f"memory_ratio{key}"] = round(naive["peak_bytes"] / max(row["peak_bytes"], 1), 2)
            summary[f"time_ratio{key}"] = round(row["seconds_fwd_bwd"] / naive["seconds_fwd_bwd"], 3)
    summary["targets"] = targets(rows)
    summary["machine"] = machine(args.device)
    print(json.dumps({"summary": summary}))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
