"""MEMO's host tier on a GPU: the device<->host copy bandwidth, and how much of the swap the
computation hides at the alpha the plan picks (memory/offload.py, memory/plan.py; issue 15).

(a) Bandwidth: one pinned host buffer and one device buffer of `--copy-mib`, copied D2H and H2D
    on a side stream (as HostPool's copies run), timed with CUDA events on that stream.
(b) A stack of Llama-3.1-8B-shaped blocks (hidden 4096, 14336, 32/8 heads of 128, rope theta
    500000, random init), B=1, S=32768, bf16 autocast over an fp32 residual stream, each block
    wrapped by `offload.wrap(block, policy, pool, chunk_tokens)`, forward + backward timed with
    CUDA events in three configurations:
      recompute  alpha=0 on the device tier (attention's out+LSE and the block input kept, the
                 rest recomputed token-wise): its forward gives the layer time the plan uses;
      device     the planned alpha on the device tier: the same computation as `host`, no copies;
      host       the planned alpha, the first L - resident blocks on the host tier (HostPool), the
                 last `resident` on the device, as train/build.py `apply_memory` wraps them.
    alpha = memory/plan.py `plan_alpha` (the closed form behind `longctx plan` and the trainer's
    `memory.alpha: auto`) with the measured link bandwidth (the slower direction) and the measured
    forward time of one layer, this process's GPUs per node (1) and host memory (80% of RAM,
    capped by --host-gib).
Swapped bytes are the host pool's bytes of one step (`HostPool.last_step_bytes`), copied once
each way. Hidden fraction, clipped to [0, 1]:
    hidden = 1 - (t_host - t_device) / (swapped_bytes / d2h_bandwidth + swapped_bytes / h2d_bandwidth)
i.e. the share of the copies' own time that does not show up in the step. Target: >= 90%. The
host run's input gradient is compared with the device run's (same computation: a copy that races
its source would show as a difference).

  python -m longctx.bench.gpu_memo_swap              # CUDA, the sizes above, 6 blocks, 2 resident
  python -m longctx.bench.gpu_memo_swap --dry-run    # CPU: a tiny model, 256 tokens (copies are synchronous)
"""

from __future__ import annotations

import argparse
import json
import os
import time

from longctx.bench import machine

TARGET_HIDDEN = 0.9
GiB = 1 << 30


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def bandwidth_rows(device, nbytes: int, repeats: int) -> dict:
    """{"d2h": bytes/s, "h2d": bytes/s}: copies between a pinned host buffer and the device on a
    side stream (events recorded on that stream; on CPU plain synchronous copies)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dev = torch.ones(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)  # warm-up
                start.record(stream)
                for _ in range(repeats):
                    dst.copy_(src, non_blocking=True)
                end.record(stream)
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            dst.copy_(src)
            t0 = time.perf_counter()
            for _ in range(repeats):
                dst.copy_(src)
            seconds = time.perf_counter() - t0
        out[name] = nbytes * repeats / seconds
        print(json.dumps({"case": f"copy_{name}", "bytes": nbytes, "repeats": repeats, "pinned": device.type == "cuda",
                          "seconds": _sig(seconds), "gb_per_s": _sig(out[name] / 1e9)}), flush=True)
    return out


def llama8b_config(layers: int, dry_run: bool):
    from longctx.models.config import ModelConfig, RopeConfig

    if dry_run:
        return ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=layers,
                           num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                           max_position_embeddings=8192, rope=RopeConfig(theta=500000.0))
    # Llama-3.1-8B's block; the vocabulary does not enter the blocks, so the embedding is kept small
    return ModelConfig(family="llama", vocab_size=256, hidden_size=4096, intermediate_size=14336, num_layers=layers,
                       num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, rope=RopeConfig(theta=500000.0))


class Stack:
    """The wrapped blocks, their policies (switched per configuration), the host pool, inputs."""

    def __init__(self, cfg, seq_len: int, resident: int, chunk_tokens: int, device) -> None:
        import torch
        from longctx.kernels.attention import LocalAttention
        from longctx.memory import offload
        from longctx.memory.offload import HostPool, LayerPolicy
        from longctx.models.llama import CausalLM

        self.device, self.resident, self.LayerPolicy = device, resident, LayerPolicy
        with torch.device(device):  # parameters made on the device (nn.Linear's own random init)
            self.model = CausalLM(cfg, attention=LocalAttention("auto"), loss=None)
        self.layers = list(self.model.model.layers)
        self.pool = HostPool(device)
        self.policies = [LayerPolicy(0.0, "device")] * len(self.layers)
        for i, block in enumerate(self.layers):
            offload.wrap(block, lambda tokens, i=i: self.policies[i], self.pool, chunk_tokens)
        g = torch.Generator(device=device.type).manual_seed(0)
        self.x = torch.randn(1, seq_len, cfg.hidden_size, generator=g, device=device).requires_grad_()
        self.dy = torch.randn(1, seq_len, cfg.hidden_size, generator=g, device=device)
        positions = torch.arange(seq_len, device=device)[None]
        self.cos, self.sin = self.model.rope_cos_sin(positions, torch.float32)

    def configure(self, alpha: float, tier: str) -> None:
        """`tier` for all but the last `resident` blocks; those keep the same alpha on the device."""
        n = len(self.layers)
        import torch

        # as the trainer wraps a bf16 run: recomputed tokens' inputs kept in bf16 (what layer_bytes plans)
        self.policies[:] = [self.LayerPolicy(alpha, tier if i < n - self.resident else "device",
                                             input_dtype=torch.bfloat16) for i in range(n)]

    def step(self) -> tuple[float, float]:
        """(forward seconds, backward seconds) of one forward + backward."""
        import torch

        cuda = self.device.type == "cuda"
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None
        if cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            torch.cuda.synchronize()
            marks[0].record()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            y = self.model.run_layers(self.x, self.cos, self.sin)
        if cuda:
            marks[1].record()
        t1 = time.perf_counter()
        y.backward(self.dy)
        if cuda:
            marks[2].record()
            marks[2].synchronize()
            return marks[0].elapsed_time(marks[1]) / 1e3, marks[1].elapsed_time(marks[2]) / 1e3
        return t1 - t0, time.perf_counter() - t1


def run_config(stack: Stack, name: str, alpha: float, tier: str, repeats: int) -> dict:
    import torch

    stack.configure(alpha, tier)
    stack.step()  # warm-up: kernels, the pool's pinned slab, staging buffers
    cuda = stack.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fwd = bwd = 0.0
    for _ in range(repeats):
        f, b = stack.step()
        fwd, bwd = fwd + f, bwd + b
    row = {"case": name, "alpha": _sig(alpha), "tier": tier, "layers": len(stack.layers),
           "resident_layers": stack.resident, "seq_len": stack.x.shape[1], "repeats": repeats,
           "fwd_seconds": _sig(fwd / repeats), "bwd_seconds": _sig(bwd / repeats),
           "step_seconds": _sig((fwd + bwd) / repeats)}
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    if tier == "host":
        row["swapped_bytes"] = stack.pool.last_step_bytes
        row["host_pool_bytes"] = stack.pool.capacity_bytes
        row["pool_regrows"] = stack.pool.regrows
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--resident", type=int, default=2, help="last blocks kept on the device (memory.resident_layers)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="memory.recompute_chunk_tokens")
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--host-gib", type=float, default=64.0, help="cap on the host memory the plan may use")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; configurations past it are skipped")
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny model: the same code path in seconds")
    args = p.parse_args(argv)
    start = time.perf_counter()

    import torch
    from longctx.memory.estimate import layer_bytes
    from longctx.memory.plan import plan_alpha
    from longctx.train.build import model_shape

    if args.dry_run:
        device = torch.device("cpu")
        args.seq_len, args.layers, args.resident, args.chunk_tokens, args.copy_mib, args.repeats = 256, 3, 1, 64, 16, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_memo_swap: no CUDA device (use --dry-run on CPU)")
        device = torch.device("cuda")

    bw = bandwidth_rows(device, args.copy_mib << 20, repeats=5)
    link = min(bw.values())
    cfg = llama8b_config(args.layers, args.dry_run)
    stack = Stack(cfg, args.seq_len, args.resident, args.chunk_tokens, device)
    rows = {}

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - start > args.time_budget

    rows["recompute"] = run_config(stack, "recompute", 0.0, "device", args.repeats)
    print(json.dumps(rows["recompute"]), flush=True)
    layer_seconds = rows["recompute"]["fwd_seconds"] / args.layers
    _, per_token = layer_bytes(model_shape(cfg), autocast=True)
    host_bytes = min(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), args.host_gib * GiB)
    plan = plan_alpha(args.seq_len, per_token, layer_seconds, link, host_bytes, 1, args.layers, args.resident)
    print(json.dumps({"case": "plan", "alpha": _sig(plan.alpha), "binding": plan.binding,
                      "layer_seconds": _sig(layer_seconds), "link_bytes_per_s": _sig(link),
                      "host_bytes_per_node": int(host_bytes),
                      "planned_swap_bytes_per_layer": int(plan.swap_bytes_per_layer)}), flush=True)

    grads = {}
    for name, tier in (("device", "device"), ("host", "host")):
        if over_budget():
            print(json.dumps({"case": name, "skipped": f"time budget of {args.time_budget:.0f} s spent"}), flush=True)
            continue
        rows[name] = run_config(stack, name, plan.alpha, tier, args.repeats)
        grads[name] = stack.x.grad.detach().clone()
        if name == "host" and "device" in grads:
            diff = float((grads["host"] - grads["device"]).abs().max())
            rows[name]["grad_max_abs_diff_vs_device"] = diff
            rows[name]["grad_max_abs"] = float(grads["device"].abs().max())
        print(json.dumps(rows[name]), flush=True)

    hidden = None
    if "host" in rows and "device" in rows:
        swapped = rows["host"]["swapped_bytes"]
        copy_seconds = swapped / bw["d2h"] + swapped / bw["h2d"]
        exposed = rows["host"]["step_seconds"] - rows["device"]["step_seconds"]
        hidden = _sig(min(max(1.0 - exposed / copy_seconds, 0.0), 1.0)) if copy_seconds > 0 else None
    summary = {
        "device": str(device), "seq_len": args.seq_len, "layers": args.layers, "resident_layers": args.resident,
        "dry_run": args.dry_run, "d2h_gb_per_s": _sig(bw["d2h"] / 1e9), "h2d_gb_per_s": _sig(bw["h2d"] / 1e9),
        "alpha": _sig(plan.alpha), "alpha_binding": plan.binding, "layer_fwd_seconds": _sig(layer_seconds),
        "step_seconds": {k: r["step_seconds"] for k, r in rows.items()},
        "swapped_bytes": rows.get("host", {}).get("swapped_bytes"),
        "hidden_fraction": hidden,
        "hidden_formula": "1 - (t_host - t_device) / (swapped/d2h_bw + swapped/h2d_bw), clipped to [0, 1]",
        "grads_match": ("host" in rows and "device" in rows and
                        rows["host"]["grad_max_abs_diff_vs_device"] <= 1e-2 * max(rows["host"]["grad_max_abs"], 1e-30)),
        "targets": {"memo_swap_hidden_ge_90pct": {
            "target": f"hidden fraction of the host tier's copies >= {TARGET_HIDDEN:.0%} at the planned alpha",
            "value": hidden, "limit": TARGET_HIDDEN, "pass": hidden is not None and hidden >= TARGET_HIDDEN}},
        "machine": machine(device),
    }
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
