"""Data sources, tokenisation and concat-and-chunk batching."""

import json

import numpy as np
import pytest
from longctx.data.pack import PackedRows
from longctx.data.sources import DataError, default_corpus, load_documents
from longctx.data.tokenize import ByteTokenizer, tokenize_documents


def test_default_corpus_is_one_document_per_book_or_chapter():
    docs = default_corpus()
    assert len(docs) == 66
    assert docs[0].startswith("In the beginning God created")
    assert sum(len(d) for d in docs) > 4_000_000
    chapters = default_corpus("chapter")
    assert len(chapters) == 1189 and chapters[0].startswith("In the beginning")
    assert abs(sum(map(len, chapters)) - sum(map(len, docs))) < 0.01 * sum(map(len, docs))


def test_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)))
    assert load_documents(str(tmp_path / "a.jsonl"), text_field="body") == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "t.txt").write_text("line one\nline two\n")
    assert load_documents(str(tmp_path / "t.txt")) == ["line one\nline two\n"]
    import pandas as pd

    pd.DataFrame({"text": ["x y", "z"]}).to_parquet(tmp_path / "p.parquet")
    assert load_documents(str(tmp_path / "p.parquet")) == ["x y", "z"]


def test_bad_records_are_counted_and_named(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "good"}, {"text": ""}, {"text": "  "}]))
    with pytest.warns(UserWarning, match=f"{path}: skipped 2 record"):
        assert load_documents(str(path)) == ["good"]


def test_unusable_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl.*file not found"):
        load_documents(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match=f"{path}: records have no field 'text'"):
        load_documents(str(path))
    path.write_text(json.dumps({"text": ""}))
    with pytest.raises(DataError, match="no usable document"), pytest.warns(UserWarning):
        load_documents(str(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: could not be read as json"):
        load_documents(str(bad))


def test_long_documents_tokenize_in_pieces_identically():
    tok = ByteTokenizer()
    doc = "word " * 1000
    whole = tokenize_documents(tok, [doc], piece_chars=1 << 20)[0]
    pieces = tokenize_documents(tok, [doc], piece_chars=97)[0]
    assert np.array_equal(whole, pieces) and whole[-1] == tok.eos_token_id


def test_packed_rows_shard_without_overlap_and_are_deterministic():
    docs = [np.arange(i * 1000, i * 1000 + 900, dtype=np.int32) for i in range(10)]
    rows = PackedRows(docs, seq_len=15, seed=3)
    for step in (0, 5, 60):  # 60 crosses into a later epoch
        shards = [rows.step_rows(step, 8, r, 4) for r in range(4)]
        whole = rows.step_rows(step, 8, 0, 1)
        assert sorted(map(tuple, np.concatenate(shards))) == sorted(map(tuple, whole))
        assert len({tuple(x) for x in whole}) == 8
    again = PackedRows(docs, seq_len=15, seed=3)
    assert np.array_equal(rows.step_rows(7, 8, 1, 2), again.step_rows(7, 8, 1, 2))
    with pytest.raises(DataError, match="cannot fill one row"):
        PackedRows([np.arange(5, dtype=np.int32)], seq_len=15)
