"""Token cache: memory-mapped arrays keyed by tokenizer and source; several processes agree with one."""

import json

import numpy as np
from longctx.data.sources import source_identity
from longctx.data.tokenize import (
    ByteTokenizer,
    TokenStore,
    tokenize_documents,
    tokenize_to_cache,
)


def test_cache_round_trip_and_reuse(tmp_path):
    docs = ["alpha beta", "gamma", "delta " * 50]
    calls = []

    def load():
        calls.append(1)
        return docs

    tok = ByteTokenizer()
    a = tokenize_to_cache(tok, load, "src-1", tmp_path, progress=False)
    b = tokenize_to_cache(tok, load, "src-1", tmp_path, progress=False)
    assert len(calls) == 1 and isinstance(b.tokens, np.memmap)
    want = TokenStore.from_arrays(tokenize_documents(tok, docs))
    assert np.array_equal(a.tokens, want.tokens) and np.array_equal(b.offsets, want.offsets)
    tokenize_to_cache(tok, load, "src-2", tmp_path, progress=False)
    assert len(calls) == 2


def test_several_processes_match_one(tmp_path):
    docs = [f"document {i} " * (i + 1) for i in range(40)]
    one = tokenize_to_cache(ByteTokenizer(), lambda: docs, "x", None, num_proc=1, progress=False)
    two = tokenize_to_cache(ByteTokenizer(), lambda: docs, "x", None, num_proc=2, batch_docs=3, progress=False)
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.offsets, two.offsets)


def test_source_identity_changes_with_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}))
    first = source_identity(str(path), "text", "train", None)
    path.write_text(json.dumps({"text": "ab"}))
    assert source_identity(str(path), "text", "train", None) != first


def _race_worker(args):
    import time as _time

    root, calls, barrier = args
    from pathlib import Path

    from longctx.data.tokenize import ByteTokenizer as Tok
    from longctx.data.tokenize import tokenize_to_cache as fill

    def slow_documents():
        with open(calls, "a") as f:
            f.write("call\n")
        _time.sleep(1.0)  # long enough that every racer misses the cache first
        return [f"document {i} " * (i + 1) for i in range(30)]

    barrier.wait(timeout=120)  # all three miss the cache together, however slow their start
    store = fill(Tok(), slow_documents, "race", Path(root), progress=False)
    return store.tokens.tolist(), store.offsets.tolist()


def test_racing_processes_tokenize_once_and_leave_no_temporary_folder(tmp_path):
    """Issue 16: two ranks filling one cache left a stray temp folder and one raised OSError."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    calls = tmp_path / "calls.txt"
    with ctx.Manager() as manager, ctx.Pool(3) as pool:
        barrier = manager.Barrier(3)
        results = pool.map(_race_worker, [(str(tmp_path / "cache"), str(calls), barrier)] * 3, chunksize=1)
    assert results[0] == results[1] == results[2]
    assert calls.read_text().count("call") == 1, "more than one process tokenized the same entry"
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len([e for e in entries if not e.endswith(".lock")]) == 1, entries
