"""Activation memory per policy: bytes saved for backward per token per layer, by tier, and step
time, on the SmolLM2-135M architecture (random weights, cut to `--layers` blocks), one row of
`--seq-len` tokens, fp32. Gradients of every setting are compared with the baseline's.

Settings: baseline (everything kept on the device), full_recompute (block inputs only),
memo_alpha_0.5, memo_full_swap (alpha = 1, all kept activations in the host tier), memo_auto
(alpha planned for this machine). `--resident-layers` blocks at the end stay on the device tier
(default 0, so the ratio shows the swap alone). Summary: device_bytes_ratio = memo_full_swap /
baseline device bytes per token per layer (target <= 0.05).

  python -m longctx.bench.activation_memory [--seq-len 2048] [--layers 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch


def main(argv=None) -> int:
    from longctx.kernels.attention import local_attention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.memory import accounting, offload
    from longctx.memory.estimate import layer_bytes
    from longctx.memory.offload import FULL_RECOMPUTE, HostPool, LayerPolicy
    from longctx.memory.plan import MemoPlanner
    from longctx.models.config import ModelConfig
    from longctx.models.llama import CausalLM
    from longctx.train.build import model_shape

    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up)")
    p.add_argument("--resident-layers", type=int, default=0)
    p.add_argument("--host-gib", type=float, default=8.0, help="host memory for memo_auto")
    args = p.parse_args(argv)

    cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=args.layers,
                      num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)

    def loss_fn(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum", impl="cce_torch")

    base_model = CausalLM(cfg, attention=local_attention, loss=loss_fn)
    base_model.init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    shape = model_shape(cfg)
    _, lb = layer_bytes(shape, autocast=False)
    planner = MemoPlanner(lb, shape.params_per_layer(), shape.heads * shape.head_dim, cfg.num_layers,
                          args.resident_layers, None, "host", lambda: 1, host_bytes_per_node=args.host_gib * (1 << 30),
                          link_bytes_per_s=5e9, flops_per_s=0.05e12, gpus_per_node=1)
    settings = {
        "baseline": None,
        "full_recompute": FULL_RECOMPUTE,
        "memo_alpha_0.5": LayerPolicy(0.5),
        "memo_full_swap": LayerPolicy(1.0),
        "memo_auto": planner,
    }
    rows, ref_grads = {}, None
    for name, policy in settings.items():
        model = copy.deepcopy(base_model)
        pool = HostPool("cpu")
        if policy is not None:
            n = len(model.model.layers)
            for i, layer in enumerate(model.model.layers):
                resident = i >= n - args.resident_layers
                if resident and policy is not FULL_RECOMPUTE:
                    offload.wrap(layer, LayerPolicy(1.0, "device"), None)
                else:
                    offload.wrap(layer, policy, pool)
        times = []
        for step in range(args.steps + 1):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with accounting.SavedBytes(model, list(model.model.layers)) as meter:
                loss = model(inputs, labels=labels)
            loss.backward()
            if step:
                times.append(time.perf_counter() - t0)
        grads = {k: p.grad for k, p in model.named_parameters()}
        if ref_grads is None:
            ref_grads = grads
        max_rel = max(((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for k, g in ref_grads.items())
        row = {
            "setting": name, "seq_len": args.seq_len, "layers": args.layers, "dtype": "fp32",
            "device_bytes_per_token_layer": meter.bytes_per_token_layer("device"),
            "host_bytes_per_token_layer": meter.bytes_per_token_layer("host"),
            "step_seconds": round(min(times), 3), "loss": round(loss.item() / args.seq_len, 5),
            "max_rel_grad_diff_vs_baseline": max_rel, "host_pool_bytes": pool.last_step_bytes,
        }
        if name == "memo_auto":
            row.update(alpha=planner.last.alpha, alpha_binding=planner.last.binding)
        row["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
        rows[name] = row
        print(json.dumps(row), flush=True)
    base = rows["baseline"]["device_bytes_per_token_layer"]
    print(json.dumps({"summary": {
        "device_bytes_ratio": rows["memo_full_swap"]["device_bytes_per_token_layer"] / base,
        "full_recompute_device_ratio": rows["full_recompute"]["device_bytes_per_token_layer"] / base,
        "memo_alpha_0.5_step_time_ratio": rows["memo_alpha_0.5"]["step_seconds"] / rows["baseline"]["step_seconds"],
        "max_rel_grad_diff": max(r["max_rel_grad_diff_vs_baseline"] for r in rows.values()),
    }}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
