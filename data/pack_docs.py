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
no token learns to predict another document; labels whose token a chat record's mask marks as
prompt are ignored too. A packing is stored as its pieces (document, start, length) and each
step's rows are gathered from the token store, so RAM does not grow with the corpus. Attention
masks pairs of different documents (kernels/documents.py); nothing here talks to a model.
"""

from __future__ import annotations

import bisect
from array import array

import numpy as np

from .sources import DataError

IGNORE_INDEX = -100


class PackedDocRows:
    """Rows of whole documents, held as their pieces [(document, start, length)] and gathered from
    the documents (memory-mapped token-store slices) when a step asks (`take`): RAM holds the
    packing, not the corpus. `tokens`, `doc_ids` and `target_mask` give every row at once, for
    tools and tests. `masks` (per document, None = every token a target) mark chat prompts."""

    def __init__(self, docs: list[np.ndarray], rows: list[list[tuple[int, int, int]]], seq_len: int, pad_id: int = 0,
                 masks: list | None = None, full: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`full` (documents, starts) are rows of one whole seq_len piece each, put first."""
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
        self.masks = masks if masks is not None and any(m is not None for m in masks) else None
        # pieces as flat arrays (24 bytes each) and each row's first piece: a packing of a large
        # corpus stays small, where lists of tuples cost ~100 bytes a piece
        full_docs, full_starts = full if full is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        flat = [piece for row in rows for piece in row]
        self.piece_doc = np.concatenate([full_docs, np.array([d for d, _, _ in flat], np.int64)])
        self.piece_start = np.concatenate([full_starts, np.array([st for _, st, _ in flat], np.int64)])
        self.piece_len = np.concatenate([np.full(len(full_docs), seq_len, np.int64),
                                         np.array([n for _, _, n in flat], np.int64)])
        counts = np.concatenate([np.ones(len(full_docs), np.int64), np.array([len(r) for r in rows], np.int64)])
        self.row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def row(self, r: int) -> list[tuple[int, int, int]]:
        """(document, start, length) of row r's pieces, in order."""
        lo, hi = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
        return list(zip(self.piece_doc[lo:hi].tolist(), self.piece_start[lo:hi].tolist(), self.piece_len[lo:hi].tolist()))

    @property
    def pieces(self) -> list[list[tuple[int, int]]]:
        """Per row: (document index, start within it) of each piece, in order."""
        return [[(d, start) for d, start, _ in self.row(r)] for r in range(self.num_rows)]

    def take(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens [n, seq_len] int32 (padding pad_id), the piece of each token in its row [n, seq_len]
        int32 (0, 1, ...; -1 on padding), target mask [n, seq_len] uint8 or None) of rows `ids`."""
        ids = np.asarray(ids).reshape(-1)
        tokens = np.full((len(ids), self.seq_len), self.pad_id, dtype=np.int32)
        doc_ids = np.full((len(ids), self.seq_len), -1, dtype=np.int32)
        target = np.ones((len(ids), self.seq_len), dtype=np.uint8) if self.masks is not None else None
        for i, r in enumerate(ids.tolist()):
            at = 0
            for k, (d, start, length) in enumerate(self.row(r)):
                tokens[i, at:at + length] = self.docs[d][start:start + length]
                doc_ids[i, at:at + length] = k
                if target is not None and self.masks[d] is not None:
                    target[i, at:at + length] = self.masks[d][start:start + length]
                at += length
        return tokens, doc_ids, target

    @property
    def tokens(self) -> np.ndarray:
        return self.take(np.arange(self.num_rows))[0]

    @property
    def doc_ids(self) -> np.ndarray:
        return self.take(np.arange(self.num_rows))[1]

    @property
    def target_mask(self) -> np.ndarray | None:
        return self.take(np.arange(self.num_rows))[2]

    def real_tokens(self) -> int:
        return int(self.piece_len.sum())

    def positions(self, row: int) -> np.ndarray:
        """Position of each token within its piece (0 on padding)."""
        pos = np.zeros(self.seq_len, dtype=np.int64)
        cu = self.cu_seqlens(row)
        for start, stop in zip(cu[:-1], cu[1:]):
            pos[start:stop] = np.arange(stop - start)
        return pos

    def cu_seqlens(self, row: int) -> np.ndarray:
        """[0, end of piece 0, end of piece 1, ...] (padding after the last end is no piece)."""
        lo, hi = int(self.row_ptr[row]), int(self.row_ptr[row + 1])
        return np.concatenate([[0], np.cumsum(self.piece_len[lo:hi])]).astype(np.int64)

    def labels(self, row: int) -> np.ndarray:
        """The next token within the same piece; IGNORE_INDEX at a piece's last token, on padding and
        before a token its document's mask marks 0."""
        tokens, doc_ids, target = self.take([row])
        return labels_and_positions(tokens, doc_ids, target)[0][0]

    def stats(self) -> dict:
        real = self.real_tokens()
        per_row = np.diff(self.row_ptr)
        return {"rows": self.num_rows, "seq_len": self.seq_len, "tokens": real,
                "padding_fraction": round(1 - real / max(self.num_rows * self.seq_len, 1), 5),
                "documents_per_row_mean": round(float(np.mean(per_row)), 3) if len(per_row) else 0.0,
                "documents_per_row_max": int(per_row.max()) if len(per_row) else 0}


def _pieces(docs: list[np.ndarray], seq_len: int, seed: int):
    """(full rows as (documents, starts) arrays, pieces shorter than a row as (doc, start, length)),
    documents in a seeded order."""
    order = np.random.default_rng([seed, 11]).permutation(len(docs))
    lengths = getattr(docs, "lengths", None)
    full_docs, full_starts = array("q"), array("q")
    items: list[tuple[int, int, int]] = []
    for d in order.tolist():
        n, start = int(lengths[d]) if lengths is not None else len(docs[d]), 0
        while n - start >= seq_len:
            full_docs.append(d)
            full_starts.append(start)
            start += seq_len
        if n - start > 0:
            items.append((d, start, n - start))
    return (np.frombuffer(full_docs, np.int64).copy(), np.frombuffer(full_starts, np.int64).copy()), items


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


def pack_documents(docs: list[np.ndarray], seq_len: int, seed: int = 0, window: int = 1024,
                   pad_id: int = 0, masks: list | None = None) -> PackedDocRows:
    """docs -> PackedDocRows (module docstring). Every token of every document appears exactly once.
    `masks` (per document, None = every token a target) mark chat prompts: their labels are ignored."""
    if seq_len < 2:
        raise DataError(f"data.seq_len={seq_len}: a packed row needs at least 2 tokens")
    full, items = _pieces(docs, seq_len, seed)
    rows = _best_fit(items, seq_len, window)[0]
    if not rows and not len(full[0]):
        raise DataError(f"data: no document tokens to pack into rows of data.seq_len={seq_len}")
    return PackedDocRows(docs, rows, seq_len, pad_id, masks, full)


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
        if rows or (L == max_len and len(full[0])):
            out[L] = PackedDocRows(docs, rows, L, pad_id, masks, full if L == max_len else None)
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
        n = self.rows.num_rows
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
        return {"rows": self.rows.num_rows, "seq_len": self.rows.seq_len} | {
            k: v for k, v in self.rows.stats().items() if k in ("padding_fraction", "documents_per_row_mean")}


def _batch(rows: PackedDocRows, ids: np.ndarray, sp: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
    tokens, docs, target = rows.take(ids)
    labels, positions = labels_and_positions(tokens, docs, target)
    return tokens.astype(np.int64), labels, sp, {"documents": docs.astype(np.int64), "positions": positions}


def _source_tokens(rows: PackedDocRows, ids: np.ndarray, doc_sources: np.ndarray | None, n_sources: int) -> np.ndarray:
    """Real tokens per source in rows `ids` (a piece's source is its document's)."""
    out = np.zeros(n_sources, dtype=np.int64)
    for r in ids.tolist():
        lo, hi = int(rows.row_ptr[r]), int(rows.row_ptr[r + 1])
        src = np.zeros(hi - lo, np.int64) if doc_sources is None else np.asarray(doc_sources)[rows.piece_doc[lo:hi]]
        out += np.bincount(src, weights=rows.piece_len[lo:hi], minlength=n_sources).astype(np.int64)
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
        real = sum(b.real_tokens() for b in self.buckets.values())
        size = sum(b.num_rows * b.seq_len for b in self.buckets.values())
        return {"buckets": {str(L): b.num_rows for L, b in self.buckets.items()},
                "steps_per_epoch": self.sampler.steps_per_epoch, "padding_fraction": round(1 - real / max(size, 1), 5)}
