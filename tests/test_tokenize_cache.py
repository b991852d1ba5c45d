"""Token cache: memory-mapped arrays keyed by tokenizer and source; several processes agree with one."""

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_tokenization_streams_records_to_disk(tmp_path):
    """Issue 23: records are consumed lazily and written as they come (RAM holds a few batches,
    not the corpus): by the 200th record, earlier batches are already in the token file."""
    seen_on_disk = []

    def records():
        for i in range(300):
            if i == 200:
                written = [p.stat().st_size for p in (tmp_path / "tokens").glob("*.tmp*/tokens.bin")]
                seen_on_disk.append(max(written, default=0))
            yield f"record {i} " * 5

    store = tokenize_to_cache(ByteTokenizer(), records, "stream", tmp_path, batch_docs=16, progress=False)
    assert store.num_documents == 300 and store.tokens.dtype == np.uint16  # 259 ids fit in 16 bits
    assert seen_on_disk and seen_on_disk[0] >= 150 * len("record 10 " * 5) * 2, seen_on_disk
    want = TokenStore.from_arrays(tokenize_documents(ByteTokenizer(), [f"record {i} " * 5 for i in range(300)]))
    assert np.array_equal(store.tokens, want.tokens) and np.array_equal(store.offsets, want.offsets)


def test_mask_file_back_fills_text_before_the_first_chat_record(tmp_path):
    from longctx.data.tokenize import HFTokenizer
    from test_chat_data import make_tokenizer

    tok = HFTokenizer(make_tokenizer(tmp_path / "tok", "qwen2.5"))
    chat = [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": "the lazy dog"}]
    records = ["the quick brown fox"] * 20 + [chat] + ["over the river"]
    one = tokenize_to_cache(tok, lambda: iter(records), "mixed", tmp_path / "c1", batch_docs=4, progress=False)
    two = tokenize_to_cache(tok, lambda: iter(records), "mixed", tmp_path / "c2", num_proc=2, batch_docs=3,
                            progress=False)
    for store in (one, two):
        assert store.loss_mask is not None and len(store.loss_mask) == len(store.tokens)
        assert (store.document_mask(0) == 1).all() and (store.document_mask(21) == 1).all()
        ids, mask = tok.encode_chat(chat)
        assert np.array_equal(store.document(20), ids) and np.array_equal(store.document_mask(20), mask)
        assert tok.decode(store.document(20)[store.document_mask(20) > 0]) == "the lazy dog<|im_end|>\n"


def test_hub_revision_is_pinned_in_the_cache_key(tmp_path, monkeypatch):
    """A hub dataset's cache key holds the commit it is read at: given, or resolved (offline, from
    the hub cache's refs/main), so a dataset that moves on is tokenized again."""
    import huggingface_hub
    import longctx.data.sources as sources

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)  # as without a network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = tmp_path / "hub" / "datasets--org--corpus" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert source_identity("org/corpus", "text", "train", None).startswith(f"hub:org/corpus:train@{'a' * 40}")
    ref.write_text("b" * 40)
    moved = source_identity("org/corpus", "text", "train", None)
    assert "b" * 40 in moved
    assert "@v1.2|" in source_identity("org/corpus", "text", "train", None, revision="v1.2")
    with pytest.raises(sources.DataError, match="data.revision"):
        source_identity("org/other", "text", "train", None)


def _revision_per_rank(rank, world, root):
    """Each rank's hub cache points main at another commit (a branch moving while ranks start);
    rank 1's cache alone knows `org/other`."""
    import os
    from types import SimpleNamespace

    import huggingface_hub
    from longctx.data.sources import DataError, resolve_revision
    from longctx.train.build import _on_main

    def offline(*args, **kwargs):
        raise OSError("offline")

    huggingface_hub.HfApi.dataset_info = offline  # this worker process only
    os.environ["HF_HUB_CACHE"] = f"{root}/hub{rank}"
    for name, sha in (("corpus", "ab"[rank] * 40), *((("other", "c" * 40),) if rank == 1 else ())):
        ref = Path(root) / f"hub{rank}" / f"datasets--org--{name}" / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
    mesh = SimpleNamespace(world=world, is_main=rank == 0)
    pinned = _on_main(mesh, lambda: resolve_revision("org/corpus", None))
    try:
        _on_main(mesh, lambda: resolve_revision("org/other", None))
        error = None
    except DataError as e:
        error = str(e)
    return pinned, resolve_revision("org/corpus", None), error


def test_hub_revision_is_the_main_ranks_on_every_rank(tmp_path):
    """The revision is resolved on rank 0 and broadcast: every rank reads (and keys its cache with)
    one commit, and rank 0's error reaches every rank instead of leaving the others waiting."""
    from _dist import run

    results = run(_revision_per_rank, 2, str(tmp_path))
    assert [r[0] for r in results] == ["a" * 40] * 2
    assert [r[1] for r in results] == ["a" * 40, "b" * 40]  # what each rank alone would have read
    assert all(r[2] and "could not be resolved" in r[2] for r in results)
