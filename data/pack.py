"""Concat-and-chunk: documents joined end to end and cut into rows of seq_len + 1 tokens.

The baseline batching that dataset decomposition is measured against (and the held-out eval
rows). Rows cross document boundaries, so tokens attend to unrelated documents. Row order is a
seeded permutation; step s takes rows [s*B, (s+1)*B) of it (wrapping into a new permutation each
epoch), and data-parallel rank r takes every world-th row of those, so shards never overlap and
the stream depends only on (seed, step): resuming at step s continues with exactly that batch.
"""

from __future__ import annotations

import numpy as np

from .sources import DataError


class PackedRows:
    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int = 0) -> None:
        stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
        n_rows = len(stream) // (seq_len + 1)
        if n_rows == 0:
            raise DataError(
                f"data: {len(stream)} tokens cannot fill one row of seq_len+1={seq_len + 1} tokens; "
                "lower data.seq_len or add documents"
            )
        self.rows = stream[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1)
        self.train_ids = np.arange(n_rows)
        self.seq_len, self.seed = seq_len, seed

    @property
    def tokens(self) -> int:
        return self.rows.size

    def step_rows(self, step: int, batch_size: int, rank: int, world: int) -> np.ndarray:
        """Rows of optimizer step `step` (0-based) that belong to data-parallel `rank`: [B/world, L+1]."""
        n = len(self.train_ids)
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = flat // n, flat % n
        ids = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.train_ids)
            ids[epochs == epoch] = perm[offsets[epochs == epoch]]
        return self.rows[ids[rank::world]]

    def step_batch(self, step: int, batch_size: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) [B/world, L]: labels are the rows shifted by one, before any splitting."""
        rows = self.step_rows(step, batch_size, rank, world).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]



class PackedBatches:
    """PackedRows bound to a global batch size and this rank: the trainer's per-step source."""

    def __init__(self, rows: PackedRows, batch_size: int, rank: int, world: int, sp: int = 1) -> None:
        self.rows, self.batch_size, self.rank, self.world, self.sp = rows, batch_size, rank, world, sp

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(inputs, labels, sp degree): every rank of an sp group gets the same rows."""
        return (*self.rows.step_batch(step, self.batch_size, self.rank, self.world), self.sp)

    def describe(self) -> dict:
        return {"rows": len(self.rows.train_ids), "seq_len": self.rows.seq_len}
