"""Helpers the tests/gpu files share (imported as `_gpu`, like tests/_dist.py; no conftest here)."""

from __future__ import annotations

import contextlib
import gc
import os

import torch

MiB = 1 << 20


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls in IEEE fp32 (no TF32) inside, for tight fp32 comparisons; restores the setting.

    torch >= 2.9 raises when the legacy `allow_tf32` and the new `fp32_precision` APIs are mixed,
    so only the new one is used where it exists (kernels/cce.py reads the same flag)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def release_cuda_memory() -> None:
    """Frees what the last test left in the caching allocator (big tests run back to back)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def read_jsonl_without_datasets(monkeypatch) -> None:
    """The trainer reads a local .jsonl with `datasets`' streaming reader, which the GPU machine may
    lack: its records are read here with json instead (the reader is tested on CPU in
    tests/test_data.py and tests/test_chat_data.py; the CUDA path is what is under test). Patched
    where train/build.py looks it up, so a rename there fails here instead of passing unread."""
    import itertools
    import json
    from pathlib import Path

    def iter_records(source, text_field="text", split="train", max_documents=None, revision=None):
        rows = (json.loads(line) for line in Path(source).read_text().splitlines() if line.strip())
        records = (r[text_field] for r in rows)
        return itertools.islice(records, max_documents) if max_documents else records

    monkeypatch.setattr("longctx.train.build.iter_records", iter_records)


def assert_compiled_triton() -> None:
    """The GPU suite checks the compiled Triton kernels, not the CPU interpreter."""
    assert os.environ.get("TRITON_INTERPRET") != "1", (
        "TRITON_INTERPRET=1 is set: the GPU suite must run the compiled Triton kernels; unset it "
        "(tests/conftest.py only defaults it when CUDA is unavailable)")


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def active_blocks() -> dict[int, dict]:
    """The caching allocator's live blocks now: {address: block}, each with its size and, while
    `torch.cuda.memory._record_memory_history` records, the stack that allocated it ({} when the
    snapshot cannot be read)."""
    live = {}
    try:
        segments = torch.cuda.memory._snapshot()["segments"]
    except Exception:
        return live
    for segment in segments:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                live[block["address"]] = dict(block, stream=segment.get("stream"))
    return live


def describe_new_blocks(before: dict[int, dict], known: set[int] = frozenset(), limit: int = 6) -> str:
    """The blocks live now that were not live in `before` and hold none of the `known` data
    pointers, largest first, each with its size, stream and the innermost Python frames of its
    allocation (when history was recorded)."""
    def is_known(block):
        return any(block["address"] <= p < block["address"] + block["size"] for p in known)

    try:
        new = sorted((b for a, b in active_blocks().items() if a not in before and not is_known(b)),
                     key=lambda b: -b["size"])
    except Exception as e:  # a diagnostic: it must never hide the assertion it explains
        return f"(no allocator snapshot: {type(e).__name__}: {e})"
    lines = []
    for block in new[:limit]:
        frames = [f for f in block.get("frames", []) if f.get("filename", "").endswith(".py")][:4]
        where = " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames)
        lines.append(f"{block['size'] / MiB:.2f} MiB (stream {block['stream']}): {where or 'no stack recorded'}")
    return f"{len(new)} blocks allocated since and still live: " + "; ".join(lines)
