"""Fragmentation of a training step (issue 21: planned buffers at run time): what the process
takes beyond the tensors it holds, with longctx's arena (memory.arena) and without, under glibc's
default malloc and with its mmap threshold fixed at 1 MiB (large blocks go back to the OS when
freed: the CPU's closest analogue of CUDA's expandable segments).

Each case is a fresh subprocess: SmolLM2-135M cut to `layers` blocks, fp32, full recomputation
with attention by query tiles (sp 1, the trainer's path), CCE, a warm-up step at 256 tokens and
one at the length (AdamW's states exist), then the measured step at the same length: its peak RSS
(VmHWM reset before the step). The cases differ only in the allocation path, so the comparison is
of peak RSS itself (`peak_rss_bytes`; the summary gives each case's difference from glibc's
default without the arena). `overhead_bytes` (peak RSS less parameters, AdamW's states and the
step's traced live-tensor peak, memory/accounting.LiveBytes) is given for scale: it holds the
process baseline (interpreter, libraries, ~0.5 GB) and kernels' internal scratch. The arena's
buffer is not added to the tensors: its k, v, dk, dv are not live at the step's peak without it
either (a cold review found the first version crediting the arena with its own 25 MB). On CUDA the same question is peak reserved less peak allocated
(bench/gpu_step.py records both).

  python -m longctx.bench.fragmentation [--seq-len 16384] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MMAP_1MIB = 1 << 20


def _case(seq_len: int, layers: int, arena: bool) -> dict:
    import torch
    from longctx.bench.max_context import _reset_peak, _status_bytes
    from longctx.memory.accounting import LiveBytes
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import build_model

    recipe = schema.load(None, ["memory.policy=full", "loss.impl=cce", f"memory.arena={str(arena).lower()}"])
    model, _, _ = build_model(recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")))
    model.model.layers = model.model.layers[:layers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    tokens = torch.randint(0, 49152, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step(n: int, meter=None):
        x, y = tokens[:, :n], tokens[:, 1:n + 1]
        if meter is None:
            loss = model(x, labels=y) / n
            loss.backward()
        else:
            with meter:
                loss = model(x, labels=y) / n
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(256)
    step(seq_len)
    before = _reset_peak()
    state = list(model.parameters()) + [t for st in optimizer.state.values() for t in st.values()]
    state_bytes = sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))
    arena_obj = model.model.layers[0].forward.memo_layer.arena
    arena_bytes = arena_obj.nbytes if arena_obj is not None else 0
    meter = LiveBytes()
    t0 = time.perf_counter()
    loss = step(seq_len, meter)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    tensors = state_bytes + meter.peak
    return {"seq_len": seq_len, "layers": layers, "arena": arena, "peak_rss_bytes": peak, "rss_before_bytes": before,
            "state_bytes": state_bytes, "arena_bytes": arena_bytes, "peak_live_step_tensor_bytes": meter.peak,
            "overhead_bytes": peak - tensors, "overhead_share": round((peak - tensors) / peak, 4),
            "loss": round(loss, 5), "step_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.seq_len, args.layers, args.case == "arena")))
        return 0
    rows = []
    for malloc in ("default", "mmap_1mib"):
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if malloc == "mmap_1mib":
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_1MIB)
        for case in ("allocator", "arena"):
            out = subprocess.run([sys.executable, "-m", "longctx.bench.fragmentation", "--case", case,
                                  "--seq-len", str(args.seq_len), "--layers", str(args.layers)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                row = {"case": case, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            row["malloc"] = malloc
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in rows if "overhead_bytes" in r]
    best = min(ok, key=lambda r: r["peak_rss_bytes"], default=None)
    base = next((r["peak_rss_bytes"] for r in ok if r["malloc"] == "default" and not r["arena"]), None)
    print(json.dumps({"summary": {
        "seq_len": args.seq_len, "layers": args.layers,
        "peak_rss_bytes": {f"{r['malloc']}/{'arena' if r['arena'] else 'allocator'}": r["peak_rss_bytes"] for r in ok},
        "peak_rss_vs_default_allocator_bytes": {
            f"{r['malloc']}/{'arena' if r['arena'] else 'allocator'}": r["peak_rss_bytes"] - base for r in ok} if base else None,
        "least_peak_rss": None if best is None else f"{best['malloc']}/{'arena' if best['arena'] else 'allocator'}",
        "losses_equal": len({r["loss"] for r in ok}) <= 1,
    }}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
