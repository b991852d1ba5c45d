"""`longctx plan <recipe> --gpus N --gpu-mem 80GiB --host-mem 1TiB`: will it fit, how fast, and the
longest sequence that fits (memory/estimate.py is the model; this file reads the recipe), and
what each sequence-parallel attention schedule would cost on the described machine
(parallel/choose.py is that model)."""

from __future__ import annotations

import re

from ..memory.estimate import GiB, ModelShape, Setting, estimate, longest_fitting
from ..parallel.choose import SCHEDULES, Shape, choose, label
from ..parallel.topology import Machine

# Architectures of hub checkpoints a recipe may name, so planning works offline (facts from their
# config.json files).
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B": ModelShape(4096, 14336, 32, 32, 8, 128, 128256),
    "meta-llama/Llama-3.1-70B": ModelShape(8192, 28672, 80, 64, 8, 128, 128256),
    "Qwen/Qwen2.5-7B": ModelShape(3584, 18944, 28, 28, 4, 128, 152064, qkv_bias=True),
    "mistralai/Mistral-7B-v0.1": ModelShape(4096, 14336, 32, 32, 8, 128, 32000),
}
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{what}={text!r}: expected a size like 80GiB, 1TiB or 512GB")
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


def setting_for(r: dict, gpus: int, gpu_mem: float, host_mem: float, gpus_per_node: int, seq_len: int,
                sharding: str, runtime_bytes: float, flops: float, link: float) -> Setting:
    return Setting(
        seq_len=seq_len, rows=1, sp=r["sp_degree"], dp=gpus, gpus_per_node=gpus_per_node, sharding=sharding,
        autocast=r["autocast"], policy=r["policy"], alpha=r["alpha"], tier=r["tier"],
        resident_layers=r["resident_layers"], recompute_num_layers=r["recompute_num_layers"],
        recompute_chunk_tokens=r["recompute_chunk_tokens"], loss=r["loss"], device_bytes=gpu_mem, host_bytes_per_node=host_mem,
        link_bytes_per_s=link, flops_per_s=flops, runtime_bytes=runtime_bytes,
        kept_inputs_in_compute_dtype=r.get("kept_inputs_in_compute_dtype", True),
        loss_tile_tokens=r.get("loss_tile_tokens", r["recompute_chunk_tokens"]),
        attention_by_rows=r.get("attention_by_rows", True),
        cpu_offload=r.get("cpu_offload", False), fsdp_param_bf16=r.get("fsdp_param_bf16", False),
        arena=r.get("arena", False), elimination_keep=r.get("elimination_keep"),
        elimination_predictor_flops=r.get("elimination_predictor_flops"),
    )


# What the CUDA caching allocator reserves beyond the peak of live tensors (fragmentation, with
# expandable segments as bench/gpu_step.py and the trainer set them): measured on an H200 at
# +2.7% to +6.3% over the allocated peak of warm steps at 8K-64K tokens (gpu-h200-step.jsonl,
# reserved_peak_bytes). A plan fits when the peak plus this share is within the GPU's memory.
ALLOCATOR_RESERVE = 0.08
SEARCH_LIMIT = 1 << 24  # the longest length the plan searches (tokens)
# What the memory model's GPU figures rest on (printed with every plan, and in --json).
CALIBRATION = ("calibrated on one H200 step (Llama-3.1-8B's shape cut to 4 blocks, bf16 autocast, MEMO, "
               "PyTorch's flash attention, 8K-131K tokens: within 0.3% on warm steps); other GPUs, attention "
               "kernels and multi-GPU runs are not measured")


def plan(shape: ModelShape, r: dict, gpus: int, gpu_mem: float, host_mem: float, gpus_per_node: int | None = None,
         sharding: str = "fsdp2", runtime_bytes: float = 1.0 * GiB, tflops: float = 300.0, link_gbps: float = 25.0,
         seq_len: int | None = None) -> dict:
    """`r`: the recipe's planning inputs (train/build.py `plan_inputs`)."""
    per_node = gpus_per_node or min(gpus, 8)
    length = seq_len or r["seq_len"]
    # the recipe's sequence-parallel degree on the GPUs given: the largest divisor of the GPU
    # count not above it (sp 8 on 4 GPUs plans sp 4)
    asked = r["sp_degree"]
    sp = max(d for d in range(1, min(asked, gpus) + 1) if gpus % d == 0)
    r = dict(r, sp_degree=sp)

    budget = gpu_mem / (1 + ALLOCATOR_RESERVE)  # what the live tensors may peak at

    def at(n: int, alpha=r["alpha"]):
        return estimate(shape, setting_for(dict(r, alpha=alpha), gpus, gpu_mem, host_mem, per_node, n, sharding,
                                           runtime_bytes, tflops * 1e12, link_gbps * 1e9))

    def fitted(n: int):
        """MEMO's alpha bounds (bandwidth, host memory) say nothing of the GPU, yet a larger alpha
        grows its staging buffers and resident layers: where `auto` overflows the GPU, lower alpha to
        the largest that fits (the recipe must then set it: the trainer plans only the two bounds)."""
        e = at(n)
        if r["policy"] != "memo" or r["alpha"] != "auto" or e.total <= budget or at(n, 0.0).total > budget:
            return e
        lo, hi = 0.0, e.alpha
        while hi - lo > 1e-3:
            lo, hi = ((lo + hi) / 2, hi) if at(n, (lo + hi) / 2).total <= budget else (lo, (lo + hi) / 2)
        lo = int(lo * 100) / 100  # a value to write in the recipe, rounded down
        e = at(n, lo)
        e.alpha_binding = "device_memory"
        return e

    e = fitted(length)
    step = 1024 * sp
    longest = longest_fitting(fitted, budget, lo=step, hi=SEARCH_LIMIT, step=step, host_budget=host_mem)
    fits_host = e.host_bytes_per_node <= host_mem
    # what stops the next length: host memory, or the GPU's peak (its phase and largest term)
    nxt = fitted(longest + step)
    if longest + step > SEARCH_LIMIT:
        binding = "search_limit"
    elif nxt.host_bytes_per_node > host_mem:
        binding = "host_memory"
    else:
        parts = {k: nxt.terms[k] for k in ("params", "optimizer", "staging_buffers", "communication", "arena", "runtime")}
        parts.update({k: v for k, v in nxt.phase_parts.get(nxt.peak_phase, {}).items() if k in nxt.terms})
        binding = f"gpu_memory: {nxt.peak_phase} phase (largest term {max(parts, key=parts.get)})"
    return {
        "model_params": shape.params(), "gpus": gpus, "gpus_per_node": per_node, "sharding": sharding,
        "sp_degree": sp, "sp_fitted_from": asked if asked != sp else None, "seq_len": length, "policy": r["policy"],
        "alpha": e.alpha, "alpha_binding": e.alpha_binding,
        "terms_bytes": e.terms, "phases_bytes": e.phases, "peak_phase": e.peak_phase, "total_bytes": e.total, "gpu_bytes": gpu_mem,
        "reserve_bytes": ALLOCATOR_RESERVE * e.total, "fits": e.total <= budget and fits_host,
        "dominant": e.dominant, "host_bytes_per_node": e.host_bytes_per_node, "host_limit_bytes": host_mem,
        "step_seconds": e.step_seconds, "tokens_per_second_per_gpu": length / e.step_seconds / gpus,
        "longest_seq_len": longest,
        # the same figures under the names scripts check (issue 16): per GPU, longest in tokens
        "peak_bytes_per_gpu": e.total, "longest_tokens": longest, "binding_term": binding,
        "calibration": CALIBRATION, "cpu_offload": bool(r.get("cpu_offload")) and sharding == "fsdp2",
    }



def format_plan(p: dict) -> str:
    lines = [f"{p['model_params'] / 1e9:.2f}B params, {p['gpus']} GPUs ({p['gpus_per_node']}/node), "
             f"sharding {p['sharding']}, sp {p['sp_degree']}, policy {p['policy']}"
             + (f" (alpha {p['alpha']:.2f}, limited by {p['alpha_binding']})" if p["policy"] == "memo" else ""),
             f"sequence {p['seq_len']:,} tokens — per GPU:", ""]
    lines.append(f"  {'term':<22}{'GiB':>10}")
    for k, v in p["terms_bytes"].items():
        lines.append(f"  {k:<22}{v / GiB:>10.2f}")
    lines.append(f"  {'peak':<22}{p['total_bytes'] / GiB:>10.2f}   "
                 f"(params, optimizer, buffers and runtime + the {p['peak_phase'].replace('_', ' ')} phase)")
    lines.append(f"  {'+ allocator reserve':<22}{p['reserve_bytes'] / GiB:>10.2f}   "
                 f"= {(p['total_bytes'] + p['reserve_bytes']) / GiB:.2f} of {p['gpu_bytes'] / GiB:.0f} GiB "
                 f"({100 * ALLOCATOR_RESERVE:.0f}% of the peak, measured on an H200)")
    lines += ["", f"dominant term: {p['dominant']}",
              f"host memory per node (activations{', offloaded parameters and optimizer' if p.get('cpu_offload') else ''}): "
              f"{p['host_bytes_per_node'] / GiB:.1f} GiB "
              f"of {p['host_limit_bytes'] / GiB:.0f} GiB",
              f"step time (modelled): {p['step_seconds']:.1f} s, {p['tokens_per_second_per_gpu']:.0f} tokens/s/GPU",
              f"fits: {'yes' if p['fits'] else 'NO'}; longest sequence that fits: {p['longest_seq_len']:,} tokens "
              f"(device and host memory; the next length is stopped by {p['binding_term']})"]
    if p.get("sp_fitted_from"):
        lines.insert(1, f"sp {p['sp_fitted_from']} in the recipe, planned as sp {p['sp_degree']}: the largest divisor of "
                        f"{p['gpus']} GPUs not above it")
    if p["alpha_binding"] == "device_memory":
        lines.append(f"alpha auto overflows the GPU at this length: set memory.alpha: {p['alpha']:.2f} in the recipe")
    lines.append(f"memory model: {CALIBRATION}")
    if "attention" in p:
        lines += ["", format_attention(p["attention"])]
    return "\n".join(lines)


# --- attention schedules (parallel/choose.py) ----------------------------------------------------
def attention_plan(shape: ModelShape, seq_len: int, sp: int, machine: Machine, dtype_bytes: int = 2, rows: int = 1,
                   sp_inner: int | None = None, candidates=SCHEDULES, memo: bool = False) -> dict:
    """Each schedule's modelled attention time (one layer fwd+bwd, and x layers) and the bytes its
    busiest rank sends per link class, for `rows` rows of `seq_len` tokens over sp ranks; memo:
    memory.policy keeps (out, lse), so attention's backward is the schedule's own (choose.Shape)."""
    s = Shape(seq_len, shape.heads, shape.kv_heads, shape.head_dim, sp, dtype_bytes, batch=rows, memo=memo)
    c = choose(s, machine, candidates=candidates, sp_inner=sp_inner)
    schedules = {}
    for name, e in c.table.items():
        runs = e["seconds"] < float("inf")  # JSON has no infinity: a schedule that cannot run gets null times
        row = {"label": label(name, e), "layer_seconds": e["seconds"] if runs else None,
               "step_seconds": e["seconds"] * shape.layers if runs else None,
               "bytes_intra": e["bytes_intra"], "bytes_inter": e["bytes_inter"]}
        row.update({k: e[k] for k in ("bound", "why", "outer", "sp_inner", "fwd_seconds", "bwd_seconds") if k in e})
        schedules[name] = row
    ranked = sorted((n for n in schedules if schedules[n]["layer_seconds"] is not None),
                    key=lambda n: schedules[n]["layer_seconds"])
    best = schedules[c.name]
    reason = f"picked {best['label']}: {_ms(best['layer_seconds'])} per layer ({best['bound']})"
    if len(ranked) > 1:
        runner = schedules[ranked[1]]
        gap = runner["layer_seconds"] / best["layer_seconds"] - 1
        reason += f", {100 * gap:.1f}% under the next, {runner['label']} ({runner['bound']})"
    i, x = machine.intra, machine.inter
    return {
        "seq_len": seq_len, "rows": rows, "sp": sp, "layers": shape.layers, "heads_q": shape.heads,
        "heads_kv": shape.kv_heads, "head_dim": shape.head_dim, "dtype_bytes": dtype_bytes,
        "machine": {"name": machine.name, "ranks_per_node": machine.ranks_per_node, "intra": i.name,
                    "intra_bytes_per_s": i.out_bytes_per_s, "intra_pairwise": i.pairwise, "intra_latency_s": i.latency,
                    "inter": x.name, "inter_bytes_per_s": x.out_bytes_per_s, "inter_latency_s": x.latency,
                    "attention_flops": machine.flops, "step_overhead_s": machine.step_overhead,
                    "memory_bandwidth": machine.memory_bandwidth},
        "schedules": schedules, "picked": c.name, "outer": c.outer, "sp_inner": c.sp_inner,
        "reason": reason, "why": c.why,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def format_attention(a: dict) -> str:
    m = a["machine"]
    nodes = -(-a["sp"] // m["ranks_per_node"])
    lines = [f"attention, modelled (not measured): sp {a['sp']} on {nodes} node{'s' if nodes > 1 else ''} "
             f"({m['name']}), {a['seq_len']:,} tokens x {a['rows']} row, heads "
             f"{a['heads_q']}/{a['heads_kv']} d{a['head_dim']}", "",
             f"  {'schedule':<36}{'ms/layer':>10}{'s/step':>9}{'intra MiB':>11}{'inter MiB':>11}  (fwd+bwd; "
             f"step = x {a['layers']} layers; MiB sent by the busiest rank per layer)"]
    for row in a["schedules"].values():
        if row["layer_seconds"] is None:
            lines.append(f"  {row['label']:<36}{'n/a':>10}   {row['why']}")
            continue
        lines.append(f"  {row['label']:<36}{row['layer_seconds'] * 1e3:>10.2f}{row['step_seconds']:>9.2f}"
                     f"{row['bytes_intra'] / 2**20:>11.1f}{row['bytes_inter'] / 2**20:>11.1f}  {row['bound']}")
    lines += ["", a["reason"]]
    return "\n".join(lines)
