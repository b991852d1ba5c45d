"""`longctx plan <recipe> --gpus N --gpu-mem 80GiB --host-mem 1TiB`: will it fit, how fast, and the
longest sequence that fits (memory/estimate.py is the model; this file reads the recipe), and
what each sequence-parallel attention schedule would cost on the described machine
(parallel/choose.py is that model), and under parallel.vocab_parallel what each variant would send
and cost per bucket and what `auto` picks (parallel/vocab.py's byte model)."""

from __future__ import annotations

import re

from ..data.sampler import sp_for_length
from ..memory.estimate import GiB, ModelShape, Setting, estimate, longest_fitting, trained_elements
from ..memory.vocab_buffers import rows_per_rank
from ..parallel import vocab
from ..parallel.choose import SCHEDULES, Shape, choose, label
from ..parallel.layout import padded_length
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


class PlanError(ValueError):
    """A planning input the user can fix (cli.py reports it as a recipe error: exit 2)."""


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
        mlp_channels=r.get("mlp_channels", 1.0),
        vocab_parallel=r.get("vocab_parallel", "off"), vocab_group=r.get("vocab_group", 1),
        adapter=r.get("adapter"),
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
    r = dict(r, sp_degree=sp, gpus=gpus, vocab_group=vocab_group(r.get("vocab_parallel", "off"), sharding, gpus, sp))

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
        "model_params": shape.params(), "trained_params": trained_elements(shape, r.get("adapter"))[0],
        "adapter": r.get("adapter"), "gpus": gpus, "gpus_per_node": per_node, "sharding": sharding,
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
        **({"vocab": vocab_plan(shape, r, length, sharding)} if r.get("vocab_parallel", "off") != "off" else {}),
    }



def format_plan(p: dict) -> str:
    lines = [f"{p['model_params'] / 1e9:.2f}B params, {p['gpus']} GPUs ({p['gpus_per_node']}/node), "
             f"sharding {p['sharding']}, sp {p['sp_degree']}, policy {p['policy']}"
             + (f" (alpha {p['alpha']:.2f}, limited by {p['alpha_binding']})" if p["policy"] == "memo" else ""),
             f"sequence {p['seq_len']:,} tokens — per GPU:", ""]
    if p.get("adapter"):
        rank, targets, full = p["adapter"]
        lines.insert(1, f"LoRA rank {rank} on {','.join(targets)}{' + ' + ','.join(full) + ' in full' if full else ''}: "
                        f"{p['trained_params'] / 1e6:.1f}M parameters trained (gradients and AdamW states for those only)")
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
    if "vocab" in p:
        lines += ["", format_vocab(p["vocab"])]
    if "attention" in p:
        lines += ["", format_attention(p["attention"])]
    return "\n".join(lines)


# --- vocabulary parallelism (parallel/vocab.py) -------------------------------------------------
def vocab_group(variant: str, sharding: str, gpus: int, sp: int) -> int:
    """Ranks the vocabulary rows are sharded over (recipes/schema.py vocab_group_size with the
    plan's sharding and GPUs): every GPU under fsdp2, else the sp group; 1 when off."""
    if variant == "off":
        return 1
    if sharding.startswith("zero"):
        raise PlanError(f"parallel.vocab_parallel={variant!r}: not with --sharding {sharding} (ZeRO would "
                        "partition the shards again, as parallel.sharding deepspeed); plan with --sharding fsdp2 or "
                        "none, or set off")
    group = gpus if sharding == "fsdp2" else sp
    if group == 1:
        raise PlanError(f"parallel.vocab_parallel={variant!r}: shards the vocabulary over the sp group (every GPU "
                        f"under --sharding fsdp2), and this plan has one rank there (--gpus {gpus}, sp {sp}, sharding "
                        f"{sharding}); raise parallel.sp_degree, plan more GPUs with fsdp2, or set off")
    return group


def _vocab_cost(variant: str, calls: list[int], tokens: int, shape: ModelShape, group: int, flops: float,
                link: float) -> tuple[float, float]:
    """(bytes sent, seconds) of one rank's embedding (one call on `tokens` ids) and loss head (one
    call per entry of `calls`), forward and backward, by vocab.bytes_per_rank and predict_seconds.
    predict_seconds prices both layers at one token count; the embedding's transfer is a term of its
    own in both variants, so a head call costs predict_seconds less that term (exact with one call)."""
    V, D = shape.vocab, shape.hidden

    def embedding_bytes(n: int) -> int:
        return vocab.bytes_per_rank(variant, "embedding", n, V, D, group)

    sent = sum(vocab.bytes_per_rank(variant, "head", n, V, D, group) for n in calls) + embedding_bytes(tokens)
    head_seconds = sum(vocab.predict_seconds(variant, n, V, D, group, flops, link) - embedding_bytes(n) / link
                       for n in calls)
    return float(sent), head_seconds + embedding_bytes(tokens) / link


def rows_per_call(r: dict, L: int, sp_L: int, local_len: int) -> int:
    """Rows of one micro-batch on a rank (train/trainer._micro_rows): what one vocabulary-parallel
    call of the embedding sees, and what the loss head sees when it is not tiled."""
    gpus = r.get("gpus", r["sp_degree"])
    if not r.get("bucketed", r.get("batching", "decompose") == "decompose"):
        rows = max(1, r.get("batch_size", 1) // max(1, gpus // r["sp_degree"]))
        return max(1, -(-rows // r.get("grad_accum", 1)))
    rows = max(1, r.get("tokens_per_step", L) // L // max(1, gpus // sp_L))
    mbt = r.get("micro_batch_tokens")
    return rows if mbt is None else min(rows, max(1, mbt // local_len))


def vocab_plan(shape: ModelShape, r: dict, length: int, sharding: str) -> dict:
    """Per bucket length up to `length`: this rank's tokens in one micro-batch (its rows x length /
    the bucket's sp degree), the bytes each variant sends and the seconds it takes for the
    embedding and loss head of that micro-batch (fp32 weights and hidden states, as the run passes
    them), and what `auto` picks, with the
    figures the run's auto uses (train/build.py memory_hardware: memory.device_tflops and
    memory.link_gbps, else the CUDA defaults). Under memory.policy full/memo the head runs in tiles
    of recompute_chunk_tokens (models/llama._TiledHead): one vocabulary-parallel call per tile, and
    auto picks per call, so the head's pick follows the tile (shown: a full tile's) and the
    embedding's the whole row."""
    variant, group, sp = r["vocab_parallel"], r["vocab_group"], r["sp_degree"]
    flops, link = r["vocab_flops_per_s"], r["vocab_link_bytes_per_s"]
    tile = r["recompute_chunk_tokens"] if r["policy"] != "none" else None
    lengths = sorted({L for L in r.get("bucket_lengths", ()) if L < length} | {length})
    buckets = []
    for L in lengths:
        sp_L = sp_for_length(L, sp, r.get("min_tokens_per_sp_rank", 1))
        local = L if sp_L == 1 else padded_length(L, sp_L) // sp_L
        rows = rows_per_call(r, L, sp_L, local)
        tokens = rows * local
        calls = [min(tile, tokens - start) for start in range(0, tokens, tile)] if tile else [tokens]
        row = {"seq_len": L, "sp": sp_L, "rows": rows, "tokens_per_rank": tokens, "head_calls": len(calls)}
        for v in vocab.VARIANTS:
            sent, seconds = _vocab_cost(v, calls, tokens, shape, group, flops, link)
            row[v] = {"bytes": sent, "seconds": seconds}
        row["auto"] = {"head": vocab.choose(calls[0], shape.vocab, shape.hidden, group, flops, link),
                       "embedding": vocab.choose(tokens, shape.vocab, shape.hidden, group, flops, link)}
        buckets.append(row)
    group_of = "every GPU: fsdp2" if sharding == "fsdp2" else "the sp group"
    return {"variant": variant, "group": group, "group_of": group_of,
            "vocab_size": shape.vocab, "hidden": shape.hidden, "rows_per_rank": rows_per_rank(shape.vocab, group),
            "flops_per_s": flops, "link_bytes_per_s": link, "head_tile_tokens": tile, "buckets": buckets}


def _auto_label(pick: dict) -> str:
    return pick["head"] if pick["head"] == pick["embedding"] else f"head {pick['head']}, embedding {pick['embedding']}"


def format_vocab(v: dict) -> str:
    tile = (f"the head runs in tiles of {v['head_tile_tokens']:,} tokens (memory.recompute_chunk_tokens): one call "
            "per tile, auto picks per call" if v["head_tile_tokens"] else "the head runs in one call per row")
    lines = [f"vocabulary parallel (parallel.vocab_parallel {v['variant']}), modelled: {v['vocab_size']:,} rows over "
             f"{v['group']} ranks ({v['group_of']}), {v['rows_per_rank']:,} per rank",
             f"byte model at {v['flops_per_s'] / 1e12:g} TFLOP/s and {v['link_bytes_per_s'] / 1e9:g} GB/s per rank "
             f"(memory.device_tflops, memory.link_gbps: what the run's auto uses); {tile}", "",
             f"  {'length':>9}{'sp':>4}{'tokens/rank':>13}{'calls':>7}{'gather MiB':>12}{'stream MiB':>12}"
             f"{'gather ms':>11}{'stream ms':>11}  auto picks  (embedding + head, fwd+bwd, one micro-batch, sent per rank)"]
    for b in v["buckets"]:
        g, s = b["gather"], b["stream"]
        lines.append(f"  {b['seq_len']:>9,}{b['sp']:>4}{b['tokens_per_rank']:>13,}{b['head_calls']:>7}"
                     f"{g['bytes'] / 2**20:>12.1f}{s['bytes'] / 2**20:>12.1f}{g['seconds'] * 1e3:>11.2f}"
                     f"{s['seconds'] * 1e3:>11.2f}  {_auto_label(b['auto'])}")
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
