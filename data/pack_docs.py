"""Whole documents packed into rows, with their boundaries (issue 18, the data half).

Rows of `seq_len` tokens are filled with whole documents; a document longer than a row gives full
rows of its first tokens and packs its remainder like any other document. The packer is best fit
over a window: the documents (in a seeded order) are taken `window` at a time, longest first, and
each goes into the open row with the least room that still holds it (a new row when none does);
rows stay open across windows, so only the last ones are short. Padding comes out well under 2% on
corpora of many documents shorter than a row (the bin-packing folklore for first-fit decreasing:
within 11/9 of optimal, and far closer when items are small against the bin).

For every row: the tokens (padding `pad_id`), the document of each token (0, 1, ... in the row,
-1 on padding), the position of each token within its piece of document (restarting at 0, as a
decomposed piece's do), `cu_seqlens` (the pieces' boundaries, flash-attn's varlen convention) and
the labels: the next token of the same piece, -100 at each piece's last token and on padding, so
no token learns to predict another document. Attention must mask pairs of different documents
(kernels/attention.py, not built yet); nothing here talks to a model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .sources import DataError

IGNORE_INDEX = -100


@dataclass
class PackedDocRows:
    tokens: np.ndarray  # [rows, seq_len] int32
    doc_ids: np.ndarray  # [rows, seq_len] int16/int32: the document of each token in its row, -1 = padding
    pieces: list[list[tuple[int, int]]]  # per row: (document index, start within it) of each piece, in order
    target_mask: np.ndarray | None = None  # [rows, seq_len] uint8: 0 = never a target (chat prompts); None = all

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def positions(self, row: int) -> np.ndarray:
        """Position of each token within its piece (0 on padding)."""
        ids = self.doc_ids[row]
        pos = np.zeros(len(ids), dtype=np.int64)
        for start, stop in zip(self.cu_seqlens(row)[:-1], self.cu_seqlens(row)[1:]):
            pos[start:stop] = np.arange(stop - start)
        return pos

    def cu_seqlens(self, row: int) -> np.ndarray:
        """[0, end of piece 0, end of piece 1, ...] (padding after the last end is no piece)."""
        ids = self.doc_ids[row]
        real = int((ids >= 0).sum())
        changes = np.flatnonzero(np.diff(ids[:real])) + 1
        return np.concatenate([[0], changes, [real]]).astype(np.int64)

    def labels(self, row: int) -> np.ndarray:
        """The next token within the same piece; IGNORE_INDEX at a piece's last token and on padding."""
        ids, tok = self.doc_ids[row], self.tokens[row].astype(np.int64)
        out = np.full(len(tok), IGNORE_INDEX, dtype=np.int64)
        same = (ids[:-1] == ids[1:]) & (ids[:-1] >= 0)
        if self.target_mask is not None:
            same &= self.target_mask[row][1:] > 0
        out[:-1][same] = tok[1:][same]
        return out

    def stats(self) -> dict:
        real = int((self.doc_ids >= 0).sum())
        per_row = [len(p) for p in self.pieces]
        return {"rows": len(self.pieces), "seq_len": self.seq_len, "tokens": real,
                "padding_fraction": round(1 - real / max(self.tokens.size, 1), 5),
                "documents_per_row_mean": round(float(np.mean(per_row)), 3) if per_row else 0.0,
                "documents_per_row_max": max(per_row, default=0)}


def _pieces(docs: list[np.ndarray], seq_len: int, seed: int):
    """(full rows, pieces shorter than a row) as (doc, start, length), documents in a seeded order."""
    order = np.random.default_rng([seed, 11]).permutation(len(docs))
    full: list[list[tuple[int, int, int]]] = []
    items: list[tuple[int, int, int]] = []
    for d in order.tolist():
        n, start = len(docs[d]), 0
        while n - start >= seq_len:
            full.append([(d, start, seq_len)])
            start += seq_len
        if n - start > 0:
            items.append((d, start, n - start))
    return full, items


def _best_fit(items: list[tuple[int, int, int]], seq_len: int, window: int,
              rows: list[list[tuple[int, int, int]]] | None = None, open_new: bool = True):
    """Best fit decreasing over windows of `window` pieces (module docstring), into `rows` (rows
    already holding pieces; their room is used first) -> (rows, pieces left out: with open_new
    False, those no open row holds)."""
    open_rows = [list(r) for r in rows or []]
    room = sorted((seq_len - sum(n for _, _, n in r), i) for i, r in enumerate(open_rows))  # (free tokens, row)
    room = [(free, i) for free, i in room if free > 0]
    left: list[tuple[int, int, int]] = []
    for w in range(0, len(items), window):
        for d, start, length in sorted(items[w:w + window], key=lambda it: -it[2]):
            at = bisect.bisect_left(room, (length, -1))  # the fullest open row that still holds it
            if at < len(room):
                free, i = room.pop(at)
            elif open_new:
                free, i = seq_len, len(open_rows)
                open_rows.append([])
            else:
                left.append((d, start, length))
                continue
            open_rows[i].append((d, start, length))
            if free - length > 0:
                bisect.insort(room, (free - length, i))
    return open_rows, left


def _rows(docs: list[np.ndarray], rows: list[list[tuple[int, int, int]]], seq_len: int, pad_id: int,
          masks: list | None = None) -> PackedDocRows:
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    doc_ids = np.full((len(rows), seq_len), -1, dtype=np.int32)
    chat = masks is not None and any(m is not None for m in masks)
    target = np.ones((len(rows), seq_len), dtype=np.uint8) if chat else None
    pieces = []
    for r, row in enumerate(rows):
        at = 0
        for k, (d, start, length) in enumerate(row):
            tokens[r, at:at + length] = docs[d][start:start + length]
            doc_ids[r, at:at + length] = k
            if chat and masks[d] is not None:
                target[r, at:at + length] = masks[d][start:start + length]
            at += length
        pieces.append([(d, start) for d, start, _ in row])
    return PackedDocRows(tokens, doc_ids, pieces, target)


def pack_documents(docs: list[np.ndarray], seq_len: int, seed: int = 0, window: int = 1024,
                   pad_id: int = 0, masks: list | None = None) -> PackedDocRows:
    """docs -> PackedDocRows (module docstring). Every token of every document appears exactly once.
    `masks` (per document, None = every token a target) mark chat prompts: their labels are ignored."""
    if seq_len < 2:
        raise DataError(f"data.seq_len={seq_len}: a packed row needs at least 2 tokens")
    full, items = _pieces(docs, seq_len, seed)
    rows = full + _best_fit(items, seq_len, window)[0]
    if not rows:
        raise DataError(f"data: no document tokens to pack into rows of data.seq_len={seq_len}")
    return _rows(docs, rows, seq_len, pad_id, masks)


def pack_buckets(docs: list[np.ndarray], min_len: int, max_len: int, seed: int = 0, window: int = 1024,
                 pad_id: int = 0, masks: list | None = None) -> dict[int, PackedDocRows]:
    """Whole documents packed into rows of every power-of-two length L in [min_len, max_len], for
    the length curriculum (data/sampler.py) as dataset decomposition's buckets are. A document
    longer than max_len gives full rows of max_len, and its remainder is a piece like any other.
    From the longest bucket down, bucket L takes every piece longer than L/2 (no shorter bucket
    holds it), one per row, and fills the rows' room best fit with the longest shorter pieces
    that fit; what fits nowhere goes on to the next bucket; the shortest bucket packs the rest.
    So rows are whole documents with little padding, and a bucket's share of tokens follows the
    corpus's lengths (decomposition's binary split gives short buckets more). Every token
    appears exactly once."""
    full, remaining = _pieces(docs, max_len, seed)
    lengths = [1 << k for k in range(min_len.bit_length() - 1, max_len.bit_length())]
    out = {}
    for L in reversed(lengths):
        if L == min_len:
            rows = _best_fit(remaining, L, window)[0]
        else:
            rows, _ = _best_fit([it for it in remaining if it[2] > L // 2], L, window)
            rows, remaining = _best_fit([it for it in remaining if it[2] <= L // 2], L, window, rows, open_new=False)
        if L == max_len:
            rows = full + rows
        if rows:
            out[L] = _rows(docs, rows, L, pad_id, masks)
    if not out:
        raise DataError("data: no document tokens to pack")
    return dict(sorted(out.items()))


def labels_and_positions(tokens: np.ndarray, doc_ids: np.ndarray,
                         target_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For rows [B, L]: labels (the next token of the same piece, IGNORE_INDEX at each piece's
    last token, on padding, and where the next token's `target_mask` is 0) and each token's
    position within its piece (0 on padding), as PackedDocRows.labels / positions give them row
    by row; computed per step, not stored."""
    tok = tokens.astype(np.int64)
    same = (doc_ids[:, :-1] == doc_ids[:, 1:]) & (doc_ids[:, :-1] >= 0)
    if target_mask is not None:
        same &= target_mask[:, 1:] > 0
    labels = np.full(tok.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1][same] = tok[:, 1:][same]
    idx = np.broadcast_to(np.arange(tok.shape[1]), tok.shape)
    starts = np.ones(tok.shape, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return labels, np.where(doc_ids >= 0, positions, 0)


class PackedDocBatches:
    """PackedDocRows bound to a global batch size and this rank: the trainer's per-step source.

    Row order is a seeded permutation per epoch; step s takes rows [s*B, (s+1)*B) of it and
    data-parallel rank r every world-th of those (as data/pack.PackedRows does), so the stream is
    a function of (seed, step) and a resumed run continues with exactly the next batch."""

    def __init__(self, rows: PackedDocRows, batch_size: int, rank: int, world: int, sp: int = 1, seed: int = 0,
                 doc_sources: np.ndarray | None = None, source_names: list[str] | None = None) -> None:
        self.rows, self.batch_size, self.rank, self.world, self.sp, self.seed = rows, batch_size, rank, world, sp, seed
        self.doc_sources, self.source_names = doc_sources, source_names or ["data"]

    def step_ids(self, step: int, rank: int | None = None, world: int | None = None) -> np.ndarray:
        n = len(self.rows.pieces)
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = flat // n, flat % n
        ids = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch), 13]).permutation(n)
            ids[epochs == epoch] = perm[offsets[epochs == epoch]]
        return ids[(self.rank if rank is None else rank)::(self.world if world is None else world)]

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """(inputs, labels, sp degree, {"documents", "positions"}) of this rank's rows [B/world, L]:
        labels already shifted within each document, every rank of an sp group the same rows."""
        return _batch(self.rows, self.step_ids(step), self.sp)

    def source_tokens(self, step: int) -> np.ndarray:
        return _source_tokens(self.rows, self.step_ids(step, 0, 1), self.doc_sources, len(self.source_names))

    def describe(self) -> dict:
        return {"rows": len(self.rows.pieces), "seq_len": self.rows.seq_len} | {
            k: v for k, v in self.rows.stats().items() if k in ("padding_fraction", "documents_per_row_mean")}


def _batch(rows: PackedDocRows, ids: np.ndarray, sp: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
    tokens, docs = rows.tokens[ids], rows.doc_ids[ids]
    labels, positions = labels_and_positions(tokens, docs, None if rows.target_mask is None else rows.target_mask[ids])
    return tokens.astype(np.int64), labels, sp, {"documents": docs.astype(np.int64), "positions": positions}


def _source_tokens(rows: PackedDocRows, ids: np.ndarray, doc_sources: np.ndarray | None, n_sources: int) -> np.ndarray:
    """Real tokens per source in rows `ids` (a piece's source is its document's)."""
    out = np.zeros(n_sources, dtype=np.int64)
    for r in ids.tolist():
        counts = np.bincount(rows.doc_ids[r][rows.doc_ids[r] >= 0])
        for k, (d, _) in enumerate(rows.pieces[r]):
            out[0 if doc_sources is None else doc_sources[d]] += counts[k]
    return out


class PackedDocBuckets:
    """Packed rows per bucket length (pack_buckets) under the length curriculum: each step the
    sampler (data/sampler.CurriculumSampler, as for decomposition) draws a bucket L, this rank's
    rows of it and the bucket's sp degree; the stream is a function of (seed, step)."""

    def __init__(self, buckets: dict[int, PackedDocRows], sampler, sp_rank: int = 0,
                 doc_sources: np.ndarray | None = None, source_names: list[str] | None = None) -> None:
        self.buckets, self.sampler, self.sp_rank = buckets, sampler, sp_rank
        self.doc_sources, self.source_names = doc_sources, source_names or ["data"]

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
        L, ids, sp_eff = self.sampler.batch_at(step, sp_rank=self.sp_rank)
        return _batch(self.buckets[L], ids, sp_eff)

    def source_tokens(self, step: int) -> np.ndarray:
        L, ids = self.sampler.step_rows(step)
        return _source_tokens(self.buckets[L], ids, self.doc_sources, len(self.source_names))

    def describe(self) -> dict:
        real = sum(int((b.doc_ids >= 0).sum()) for b in self.buckets.values())
        size = sum(b.tokens.size for b in self.buckets.values())
        return {"buckets": {str(L): len(b.pieces) for L, b in self.buckets.items()},
                "steps_per_epoch": self.sampler.steps_per_epoch, "padding_fraction": round(1 - real / max(size, 1), 5)}
