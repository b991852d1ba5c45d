"""The document packer (data/pack_docs.py, issue 18's data half): whole documents in rows, every
token once, boundaries, positions and labels that never cross a document, padding under 2%."""

from __future__ import annotations

import numpy as np
import pytest
from longctx.data.pack_docs import IGNORE_INDEX, pack_documents
from longctx.data.sources import DataError


def _docs(n=400, seed=0, mean=6.0, sigma=1.0, cap=20000):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean, sigma, n).astype(int), 1, cap)
    return [rng.integers(0, 1000, k).astype(np.int32) for k in lengths]


def test_every_token_once_and_whole_documents():
    docs = _docs()
    L = 2048
    packed = pack_documents(docs, L, seed=3)
    seen = {}
    for r, row in enumerate(packed.pieces):
        cu = packed.cu_seqlens(r)
        assert len(cu) == len(row) + 1
        for k, (d, start) in enumerate(row):
            piece = packed.tokens[r, cu[k]:cu[k + 1]]
            np.testing.assert_array_equal(piece, docs[d][start:start + len(piece)])
            seen.setdefault(d, []).append((start, len(piece)))
    for d, doc in enumerate(docs):
        parts = sorted(seen[d])
        assert sum(n for _, n in parts) == len(doc) and parts[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))  # contiguous, no overlap
        # only a document longer than a row is split: full rows first, then its remainder
        assert len(parts) == 1 or all(n == L for _, n in parts[:-1])


def test_labels_positions_and_boundaries_never_cross_documents():
    docs = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 3, 7, 1, 12, 2)]
    packed = pack_documents(docs, 16, seed=0, window=8)
    for r in range(len(packed.pieces)):
        ids, labels, pos, tok = packed.doc_ids[r], packed.labels(r), packed.positions(r), packed.tokens[r]
        for i in range(16):
            if ids[i] < 0:
                assert labels[i] == IGNORE_INDEX and tok[i] == 0
            elif i + 1 < 16 and ids[i + 1] == ids[i]:
                assert labels[i] == tok[i + 1] and pos[i + 1] == pos[i] + 1
            else:
                assert labels[i] == IGNORE_INDEX  # a piece's last token predicts nothing
        starts = packed.cu_seqlens(r)[:-1]
        assert (pos[starts] == 0).all()


def test_padding_under_two_percent_and_deterministic():
    docs = _docs(n=3000, seed=1)
    a = pack_documents(docs, 8192, seed=5)
    assert a.stats()["padding_fraction"] <= 0.02 and a.stats()["documents_per_row_mean"] > 1
    b = pack_documents(docs, 8192, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, pack_documents(docs, 8192, seed=6).tokens)


def test_long_documents_fill_rows_and_bad_input_is_named():
    packed = pack_documents([np.ones(100, dtype=np.int32), np.ones(7, dtype=np.int32)], 32)
    assert packed.stats()["rows"] == 4 and packed.stats()["tokens"] == 107  # 3 full rows + (4 + 7) in one
    with pytest.raises(DataError, match="data.seq_len=1"):
        pack_documents([np.ones(4, dtype=np.int32)], 1)
    with pytest.raises(DataError, match="no document tokens"):
        pack_documents([], 16)


def test_buckets_for_the_curriculum_hold_whole_documents_once():
    """pack_buckets: rows of every power-of-two length; a document no longer than max_len lies
    whole in one row of the shortest bucket that can hold it or a longer one; longer documents
    give full max_len rows and a remainder; every token once; little padding."""
    from longctx.data.pack_docs import pack_buckets

    docs = _docs(600, seed=1, cap=9000)
    min_len, max_len = 64, 4096
    buckets = pack_buckets(docs, min_len, max_len, seed=2)
    assert set(buckets) <= {64 << k for k in range(7)} and max(buckets) == max_len
    seen = {}
    real = size = 0
    for L, packed in buckets.items():
        assert packed.seq_len == L
        real += int((packed.doc_ids >= 0).sum())
        size += packed.tokens.size
        for r, row in enumerate(packed.pieces):
            cu = packed.cu_seqlens(r)
            for k, (d, start) in enumerate(row):
                piece = packed.tokens[r, cu[k]:cu[k + 1]]
                np.testing.assert_array_equal(piece, docs[d][start:start + len(piece)])
                seen.setdefault(d, []).append((start, len(piece)))
                if len(docs[d]) <= max_len:
                    assert len(piece) == len(docs[d]), "a document that fits a row is never cut"
                if L > min_len and len(piece) <= L // 2:
                    assert len(row) > 1, "a short piece in a long bucket only fills room beside a long one"
    for d, doc in enumerate(docs):
        covered = sorted(seen[d])
        assert covered[0][0] == 0 and sum(n for _, n in covered) == len(doc)
        assert all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:]))
    assert 1 - real / size <= 0.03
    again = pack_buckets(docs, min_len, max_len, seed=2)
    assert all(np.array_equal(again[L].tokens, b.tokens) for L, b in buckets.items())


def test_labels_and_positions_of_a_batch_equal_the_rows_own():
    from longctx.data.pack_docs import labels_and_positions

    packed = pack_documents(_docs(300, seed=5), 1024, seed=1)
    labels, positions = labels_and_positions(packed.tokens, packed.doc_ids)
    for r in range(len(packed.pieces)):
        np.testing.assert_array_equal(labels[r], packed.labels(r))
        np.testing.assert_array_equal(positions[r], packed.positions(r))
