"""Concat-and-chunk: documents joined end to end and cut into rows of seq_len + 1 tokens.

The baseline batching that dataset decomposition is measured against (and the held-out eval
rows). Rows cross document boundaries, so tokens attend to unrelated documents. Row order is a
seeded permutation; step s takes rows [s*B, (s+1)*B) of it (wrapping into a new permutation each
epoch), and data-parallel rank r takes every world-th row of those, so shards never overlap and
the stream depends only on (seed, step): resuming at step s continues with exactly that batch.
"""

from __future__ import annotations

import numpy as np

from .mixture import DocumentList
from .sources import DataError


class PackedRows:
    """Rows of the documents joined end to end, gathered when a step asks for them: the documents
    stay where they are (memory-mapped token store slices), so RAM does not grow with the corpus.
    `masks` (per document, None for all-target) mark chat records' prompt tokens, whose labels are
    ignored; `doc_sources` (per document) give each row's tokens per source."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int = 0, masks: list | None = None,
                 doc_sources: np.ndarray | None = None, n_sources: int = 1) -> None:
        self.docs = docs
        lengths = getattr(docs, "lengths", None)
        self.ends = np.cumsum(lengths if lengths is not None else [len(d) for d in docs], dtype=np.int64)
        total = int(self.ends[-1]) if len(docs) else 0
        n_rows = total // (seq_len + 1)
        if n_rows == 0:
            raise DataError(
                f"data: {total} tokens cannot fill one row of seq_len+1={seq_len + 1} tokens; "
                "lower data.seq_len or add documents"
            )
        self.masks = masks if masks is not None and (isinstance(masks, DocumentList) or any(
            m is not None for m in masks)) else None
        self.doc_sources = None if doc_sources is None or n_sources <= 1 else np.asarray(doc_sources)
        self.n_sources = n_sources
        self.train_ids = np.arange(n_rows)
        self.seq_len, self.seed = seq_len, seed

    def _gather(self, ids: np.ndarray, parts) -> np.ndarray:
        """[len(ids), seq_len + 1] of `parts(doc)` over each row's stream positions."""
        width = self.seq_len + 1
        out = np.empty((len(ids), width), dtype=np.int64)
        for i, r in enumerate(ids.tolist()):
            lo, hi = r * width, (r + 1) * width
            d = int(np.searchsorted(self.ends, lo, side="right"))
            at = lo
            while at < hi:
                start = int(self.ends[d - 1]) if d else 0
                take = min(hi, int(self.ends[d])) - at
                out[i, at - lo : at - lo + take] = parts(d)[at - start : at - start + take]
                at += take
                d += 1
        return out

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` [n, seq_len + 1] (int64)."""
        return self._gather(np.asarray(ids), lambda d: self.docs[d])

    @property
    def rows(self) -> np.ndarray:
        """Every row at once (small corpora and tools only: this is the corpus in RAM)."""
        return self.gather(self.train_ids)

    @property
    def tokens(self) -> int:
        return len(self.train_ids) * (self.seq_len + 1)

    def step_ids(self, step: int, batch_size: int, rank: int, world: int) -> np.ndarray:
        """Row indices of optimizer step `step` (0-based) that belong to data-parallel `rank`."""
        n = len(self.train_ids)
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = flat // n, flat % n
        ids = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.train_ids)
            ids[epochs == epoch] = perm[offsets[epochs == epoch]]
        return ids[rank::world]

    def step_rows(self, step: int, batch_size: int, rank: int, world: int) -> np.ndarray:
        """Rows of optimizer step `step` (0-based) that belong to data-parallel `rank`: [B/world, L+1]."""
        return self.gather(self.step_ids(step, batch_size, rank, world))

    def step_batch(self, step: int, batch_size: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) [B/world, L]: labels are the rows shifted by one, before any splitting."""
        ids = self.step_ids(step, batch_size, rank, world)
        rows = self.gather(ids)
        labels = rows[:, 1:]
        if self.masks is not None:
            mask = self._gather(ids, lambda d: np.ones(len(self.docs[d]), np.uint8) if self.masks[d] is None
                                else self.masks[d])
            labels = np.where(mask[:, 1:] > 0, labels, -100)
        return rows[:, :-1], labels

    def source_tokens(self, step: int, batch_size: int) -> np.ndarray:
        """Input tokens per source in the whole step's rows."""
        ids = self.step_ids(step, batch_size, 0, 1)
        if self.doc_sources is None:
            return np.array([len(ids) * self.seq_len], dtype=np.int64)
        out = np.zeros(self.n_sources, dtype=np.int64)
        width = self.seq_len + 1
        for r in ids.tolist():  # each document's overlap with the row's inputs, from the ends alone
            lo, hi = r * width, r * width + self.seq_len
            first, last = np.searchsorted(self.ends, [lo, hi - 1], side="right")
            starts = np.concatenate([[0], self.ends])[first:last + 1]
            overlap = np.minimum(self.ends[first:last + 1], hi) - np.maximum(starts, lo)
            np.add.at(out, self.doc_sources[first:last + 1], overlap)
        return out


class PackedBatches:
    """PackedRows bound to a global batch size and this rank: the trainer's per-step source."""

    def __init__(self, rows: PackedRows, batch_size: int, rank: int, world: int, sp: int = 1) -> None:
        self.rows, self.batch_size, self.rank, self.world, self.sp = rows, batch_size, rank, world, sp

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(inputs, labels, sp degree): every rank of an sp group gets the same rows."""
        return (*self.rows.step_batch(step, self.batch_size, self.rank, self.world), self.sp)

    def source_tokens(self, step: int) -> np.ndarray:
        return self.rows.source_tokens(step, self.batch_size)

    def describe(self) -> dict:
        return {"rows": len(self.rows.train_ids), "seq_len": self.rows.seq_len}
