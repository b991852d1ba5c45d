"""Loss-head benchmark: Cut Cross-Entropy vs the naive head (and Liger's fused linear CE on GPU).

Each implementation runs in a fresh subprocess. `peak_bytes` is the head's peak memory above its
inputs and its gradient outputs (dHidden, dWeight): on CUDA the allocator's peak minus those; on
CPU the process's peak RSS minus the RSS once inputs exist, minus the gradient bytes. Inputs look
like a trained model's (a few large logits per row, apple/ml-cross-entropy#15), not random noise.

  python -m longctx.bench.cce                     # CPU default: SmolLM2's head, N=8192, V=49152, D=576, fp32
  python -m longctx.bench.cce --device cuda --n 65536 --vocab 128256 --hidden 4096 --dtype bf16 --impls reference,cce,liger
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _inputs(n, vocab, hidden, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    # Push each hidden state toward its label's row so the target logit is ~9 above the crowd:
    # a loss near 2.5 nats with a peaked softmax, like a trained LM's head.
    target_rows = w[labels].float()
    h = (h.float() + 9 * target_rows / target_rows.norm(dim=1, keepdim=True)).to(dtype)
    return h.contiguous().requires_grad_(), w.requires_grad_(), labels


def _case(impl: str, n: int, vocab: int, hidden: int, dtype_name: str, device: str, repeats: int) -> dict:
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
    else:
        from longctx.kernels.loss import linear_cross_entropy

        def fn(hh, ww, yy):
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
    return {"impl": impl, "n_tokens": n, "vocab": vocab, "hidden": hidden, "dtype": dtype_name,
            "seconds_fwd_bwd": round(seconds, 4), "peak_bytes": int(max(peak, 0)), "loss": round(loss.item(), 5),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.processor() or platform.machine()}",
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impls", default="reference,cce", help="reference, cce, cce_torch, cce_triton, liger")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case, args.n, args.vocab, args.hidden, args.dtype, args.device, args.repeats)))
        return 0
    rows = {}
    for impl in args.impls.split(","):
        cmd = [sys.executable, "-m", "longctx.bench.cce", "--case", impl, "--n", str(args.n), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            row = {"impl": impl, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[impl] = row
        print(json.dumps(row), flush=True)
    summary = {}
    naive = rows.get("reference")
    for impl, row in rows.items():
        if impl != "reference" and naive:
            key = "" if impl == "cce" else f"_{impl}"
            summary[f"memory_ratio{key}"] = round(naive["peak_bytes"] / max(row["peak_bytes"], 1), 2)
            summary[f"time_ratio{key}"] = round(row["seconds_fwd_bwd"] / naive["seconds_fwd_bwd"], 3)
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
