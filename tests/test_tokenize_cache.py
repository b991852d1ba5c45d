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
