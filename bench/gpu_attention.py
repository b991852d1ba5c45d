"""Causal attention forward+backward throughput of each block kernel (kernels/attention.py) at 32K
tokens with Llama-3.1-8B's heads, against the GPU's own bf16 matmul rate measured in the same run.

Per kernel, B=1, S=32768, 32 query heads, 8 K/V heads, head_dim 128, bf16, causal:
- `fwd`: `block_attn(q, k, v, causal=True, impl=kernel)`;
- `bwd`: `block_attn_bwd(dout, q, k, v, out, lse, causal=True, impl=kernel)` from that forward;
- `fwd_bwd`: `BlockAttention.apply(q, k, v, True, kernel)` and autograd's backward (the path MEMO
  and the sp=1 trainer take with an explicit kernel);
- `sdpa`: `LocalAttention("auto")`, PyTorch's SDPA restricted to its fused kernels (the sp=1
  path without MEMO); its `bwd` is fwd_bwd - fwd.
CUDA events time `repeats` calls after a warm-up call. FLOPs follow FlashAttention's convention:
causal forward = 2 matmuls x 2 FLOPs x B x Hq x S^2 x D / 2 (half the scores are masked), backward
= 2.5 x forward (5 matmuls, the recomputed scores not counted), forward+backward = 3.5 x forward.
The baseline is an 8192^3 bf16 matmul's TFLOP/s on the same GPU. Target (issue 15): the kernel
`auto` resolves to reaches >= 50% of it in forward+backward.

  python -m longctx.bench.gpu_attention              # CUDA, the sizes above
  python -m longctx.bench.gpu_attention --dry-run    # CPU: S=256, 4/2 heads of 32, fp32; aten_cpu, reference, sdpa
"""

from __future__ import annotations

import argparse
import json
import time

from longctx.bench import machine

TARGET_FRACTION = 0.5


def seconds_per_call(fn, device, repeats: int, warmup: int = 1) -> float:
    """Mean seconds of fn() over `repeats` calls after `warmup` calls: CUDA events on CUDA (the
    host only queues work, so the interval is read after the end event completes)."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def causal_forward_flops(batch: int, heads_q: int, seq_len: int, head_dim: int) -> float:
    return 2 * 2 * batch * heads_q * seq_len * seq_len * head_dim / 2


def matmul_row(size: int, dtype, device, repeats: int) -> dict:
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: a @ b, device, repeats, warmup=2)
    return {"case": "matmul", "m": size, "n": size, "k": size, "dtype": str(dtype).removeprefix("torch."),
            "seconds": _sig(seconds), "tflops": _sig(2 * size**3 / seconds / 1e12)}


def kernel_row(kernel: str, q, k, v, dout, repeats: int) -> tuple[dict, object]:
    """Times one kernel; returns its row and its forward output (for the cross-kernel check)."""
    import torch
    from longctx.kernels.attention import BlockAttention, LocalAttention, block_attn, block_attn_bwd, resolve_kernel

    device = q.device
    B, S, Hq, D = q.shape
    if kernel == "sdpa":
        attn = LocalAttention("auto")
        with torch.no_grad():
            fwd = seconds_per_call(lambda: attn(q, k, v), device, repeats)
            out = attn(q, k, v)

        def fwd_bwd():
            return torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

        ran = attn.describe(device, q.dtype, D)
        bwd = None
    else:
        with torch.no_grad():
            fwd = seconds_per_call(lambda: block_attn(q, k, v, causal=True, impl=kernel), device, repeats)
            out, lse = block_attn(q, k, v, causal=True, impl=kernel)
            bwd = seconds_per_call(lambda: block_attn_bwd(dout, q, k, v, out, lse, causal=True, impl=kernel),
                                   device, repeats)
            del lse

        def fwd_bwd():
            return torch.autograd.grad(BlockAttention.apply(q, k, v, True, kernel), (q, k, v), dout)

        ran = resolve_kernel(kernel, device, q.dtype, D)
    both = seconds_per_call(fwd_bwd, device, repeats)
    if bwd is None:
        bwd = max(both - fwd, 0.0)
    flops = causal_forward_flops(B, Hq, S, D)
    row = {"kernel": kernel, "ran": ran, "batch": B, "seq_len": S, "heads_q": Hq, "heads_kv": k.shape[2],
           "head_dim": D, "dtype": str(q.dtype).removeprefix("torch."),
           "fwd_seconds": _sig(fwd), "bwd_seconds": _sig(bwd), "fwd_bwd_seconds": _sig(both),
           "fwd_tflops": _sig(flops / fwd / 1e12), "bwd_tflops": _sig(2.5 * flops / max(bwd, 1e-12) / 1e12),
           "fwd_bwd_tflops": _sig(3.5 * flops / both / 1e12)}
    return row, out.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernels", default="aten_flash,aten_efficient,flash_attn,sdpa")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; kernels past it are skipped")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code path in seconds")
    args = p.parse_args(argv)
    start = time.perf_counter()

    import torch
    from longctx.kernels.attention import check_kernel_available, resolve_kernel

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.seq_len, args.heads, args.kv_heads, args.head_dim, args.matmul_size, args.repeats = 256, 4, 2, 32, 256, 2
        args.kernels = "aten_cpu,reference,aten_flash,aten_efficient,flash_attn,sdpa"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_attention: no CUDA device (use --dry-run on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16

    base = matmul_row(args.matmul_size, dtype, device, repeats=max(args.repeats * 4, 10))
    print(json.dumps(base), flush=True)
    g = torch.Generator(device=device.type).manual_seed(0)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=g, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=g, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=g, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(shape_q, generator=g, device=device, dtype=dtype)

    rows, first, errors = {}, None, []
    for kernel in args.kernels.split(","):
        why = None if kernel == "sdpa" else check_kernel_available(kernel, device, dtype, args.head_dim)
        if why:
            row = {"kernel": kernel, "available": False, "why": why}
        elif args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            row = {"kernel": kernel, "skipped": f"time budget of {args.time_budget:.0f} s spent"}
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                row, out = kernel_row(kernel, q, k, v, dout, args.repeats)
            except Exception as e:  # one kernel's failure (OOM, an unsupported shape) must not end the run
                row, out = {"kernel": kernel, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}, None
                errors.append(kernel)
            if out is not None:
                row["fraction_of_matmul"] = _sig(row["fwd_bwd_tflops"] / base["tflops"])
                row["meets_target"] = row["fraction_of_matmul"] >= TARGET_FRACTION
                if device.type == "cuda":
                    row["peak_bytes"] = torch.cuda.max_memory_allocated()
                if first is None:
                    first = (kernel, out)
                else:  # every kernel computes the same attention: a wrong result would not be a speed
                    row["out_max_abs_diff_vs"] = {first[0]: float((out.float() - first[1].float()).abs().max())}
                rows[kernel] = row
            del out
        print(json.dumps(row), flush=True)

    auto = resolve_kernel("auto", device, dtype, args.head_dim)
    best = rows.get(auto)
    value = best["fwd_bwd_tflops"] if best else None
    limit = _sig(TARGET_FRACTION * base["tflops"])
    dtype_name = str(dtype).removeprefix("torch.")
    summary = {
        "device": str(device), "seq_len": args.seq_len, "batch": args.batch, "heads_q": args.heads,
        "heads_kv": args.kv_heads, "head_dim": args.head_dim, "dtype": dtype_name,
        "dry_run": args.dry_run, "matmul_tflops": base["tflops"],
        "flop_convention": "causal fwd = 2*2*B*Hq*S^2*D/2; bwd = 2.5 x fwd; fwd_bwd = 3.5 x fwd",
        "fwd_bwd_tflops": {kk: r["fwd_bwd_tflops"] for kk, r in rows.items()},
        "fraction_of_matmul": {kk: r["fraction_of_matmul"] for kk, r in rows.items()},
        "auto_kernel": auto,
        "targets": {"attention_fwd_bwd_ge_half_matmul": {
            "target": f"fwd+bwd TFLOP/s of the auto kernel ({auto}) >= {TARGET_FRACTION:.0%} of the {dtype_name} matmul rate",
            "value": value, "limit": limit, "pass": value is not None and value >= limit}},
        "machine": machine(device),
    }
    print(json.dumps({"summary": summary}))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
