"""Zigzag layout of a sequence over sp ranks (DualChunkSwap / head-tail).

The sequence is cut into 2P chunks of c tokens; rank r holds chunks r and 2P-1-r, so under a
causal mask every rank does the same work. Position ids and (already shifted) labels are split
the same way. A length not divisible by 2P is padded at the end: pad positions come after every
real token, so causality already hides them from real queries, and their labels are ignored, so
they never reach the loss.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def padded_length(seq_len: int, sp: int) -> int:
    return -(-seq_len // (2 * sp)) * (2 * sp)


def chunk_ids(rank: int, sp: int) -> tuple[int, int]:
    return rank, 2 * sp - 1 - rank


def pad(x: torch.Tensor, sp: int, dim: int = 1, pad_value=0) -> torch.Tensor:
    """x padded along `dim` to a multiple of 2*sp with pad_value (as `split` pads it)."""
    S = x.shape[dim]
    total = padded_length(S, sp)
    if total == S:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = total - S
    return torch.cat([x, torch.full(pad_shape, pad_value, dtype=x.dtype, device=x.device)], dim=dim)


def split(x: torch.Tensor, rank: int, sp: int, dim: int = 1, pad_value=0) -> torch.Tensor:
    """This rank's zigzag shard of x along `dim` (padded to a multiple of 2*sp with pad_value)."""
    chunks = pad(x, sp, dim, pad_value).chunk(2 * sp, dim=dim)
    first, second = chunk_ids(rank, sp)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def split_batch(inputs: torch.Tensor, labels: torch.Tensor, rank: int, sp: int, pad_id: int = 0):
    """(input_ids, position_ids, labels) shards of [B, S] rows; positions are global."""
    B, S = inputs.shape
    # pad positions continue the sequence (S, S+1, ...) so RoPE stays well defined for them
    positions = torch.arange(padded_length(S, sp), device=inputs.device).expand(B, -1)
    return (
        split(inputs, rank, sp, pad_value=pad_id),
        split(positions, rank, sp),
        split(labels, rank, sp, pad_value=IGNORE_INDEX),
    )


def unsplit(shards: list[torch.Tensor], seq_len: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `split` given every rank's shard (rank order); drops the padding."""
    sp = len(shards)
    chunks: list[torch.Tensor | None] = [None] * (2 * sp)
    for rank, shard in enumerate(shards):
        a, b = shard.chunk(2, dim=dim)
        first, second = chunk_ids(rank, sp)
        chunks[first], chunks[second] = a, b
    return torch.cat(chunks, dim=dim).narrow(dim, 0, seq_len)


# --- packed documents: the causal work each rank does, and balancing it (issue 18) ---------------
PAD_DOCUMENT = -1  # the document id of padding: its own document, never seen by a real token
BALANCE_THRESHOLD = 0.10  # reorder a row's documents when the busiest rank does > 10% over the mean


def _runs(ids) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of equal ids in a 1-D array."""
    ids = np.asarray(ids)
    edges = np.flatnonzero(np.diff(ids)) + 1
    bounds = np.concatenate([[0], edges, [len(ids)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


SIDES = ("query", "key")  # whose rank computes a visible pair: the query's (ring, bidir_kv, allgather_kv) or the key's (token_ring)


def _row_rank_work(lengths: list[int], sp: int, side: str = "query") -> np.ndarray:
    """Visible (query, key) pairs per rank of one row whose documents have these lengths in this
    order, counted at the query (a token at index j of its document sees j + 1 keys) or at the
    key (seen by n - j queries): the queries' rank computes a pair under ring, bidir_kv and
    allgather_kv, the keys' under token_ring, where queries travel. Rank r holds chunks r and
    2P-1-r."""
    if side == "query":
        w = np.concatenate([np.arange(1, n + 1, dtype=np.float64) for n in lengths])
    else:
        w = np.concatenate([np.arange(n, 0, -1, dtype=np.float64) for n in lengths])
    chunks = w.reshape(2 * sp, -1).sum(1)
    return chunks[:sp] + chunks[::-1][:sp]


def rank_work(docs: torch.Tensor, sp: int, side: str = "query") -> np.ndarray:
    """Visible pairs per rank [sp] of the zigzag split of rows of document ids [B, S] (padded to a
    multiple of 2*sp): what the causal document-masked blocks cost each rank."""
    ids = pad(docs, sp, pad_value=PAD_DOCUMENT).cpu().numpy()
    return sum(_row_rank_work([b - a for a, b in _runs(row)], sp, side) for row in ids)


def imbalance(work: np.ndarray) -> float:
    """The busiest rank's work over the mean, minus 1 (0 = balanced)."""
    mean = float(np.mean(work))
    return float(np.max(work)) / mean - 1.0 if mean else 0.0


def balance_documents(docs: torch.Tensor, sp: int, threshold: float = BALANCE_THRESHOLD, tries: int = 24,
                      seed: int = 0, side: str = "query") -> tuple[torch.Tensor | None, float, float]:
    """(permutation [B, S] or None, imbalance before, after) for rows of document ids [B, S]
    (S a multiple of 2*sp) split zigzag over sp ranks.

    The classic zigzag balances causal work when one document fills the row, and when documents
    are all short; a mix (a long document beside short ones) loads the ranks holding its late
    tokens. Documents are independent under the mask, so their order within a row is free: when
    the batch's imbalance exceeds `threshold`, each row (in turn, on top of the rows before it)
    takes the best of a few orders of its documents (as packed, reversed, longest first, longest
    last, the longest in the middle, seeded shuffles), the one that minimises the busiest rank's
    visible pairs, then swaps of two documents while they lower it (a bounded local search: the
    result is reported, not promised to reach the threshold). `side`: see _row_rank_work. The permutation gathers positions (inputs, labels, position ids and the ids
    themselves move with their document); None when the split is kept."""
    ids = docs.cpu().numpy()
    if ids.shape[1] % (2 * sp):
        raise ValueError(f"rows of {ids.shape[1]} tokens: pad to a multiple of 2 x sp={sp} first")
    rows = [_runs(row) for row in ids]
    before = sum(_row_rank_work([b - a for a, b in runs], sp, side) for runs in rows)
    if sp == 1 or imbalance(before) <= threshold:
        return None, imbalance(before), imbalance(before)
    total = np.zeros(sp)
    perms = []
    for i, runs in enumerate(rows):
        lengths = np.array([b - a for a, b in runs])
        n = len(runs)
        by_len = np.argsort(-lengths, kind="stable")
        middle = np.concatenate([by_len[1::2][::-1], by_len[:1], by_len[2::2]]) if n > 2 else by_len
        rng = np.random.default_rng([seed, i])
        orders = [np.arange(n), np.arange(n)[::-1], by_len, by_len[::-1], middle,
                  *(rng.permutation(n) for _ in range(tries))]
        def cost(o):
            return float(np.max(total + _row_rank_work(lengths[o].tolist(), sp, side)))

        best = min(orders, key=cost)
        best_cost = cost(best)
        for _ in range(4 * tries if n > 1 else 0):  # then swaps of two documents while they help
            i, j = rng.choice(n, 2, replace=False)
            trial = best.copy()
            trial[[i, j]] = trial[[j, i]]
            c = cost(trial)
            if c < best_cost:
                best, best_cost = trial, c
        total += _row_rank_work(lengths[best].tolist(), sp, side)
        perms.append(np.concatenate([np.arange(*runs[j]) for j in best]))
    return torch.as_tensor(np.stack(perms), dtype=torch.long), imbalance(before), imbalance(total)


def balanced_layout(docs: torch.Tensor, sp: int, long_doc: int | None = None,
                    side: str = "query") -> tuple[torch.Tensor, np.ndarray]:
    """(permutation [B, S], visible pairs per rank [sp]) of rows of document ids [B, S] (S a
    multiple of 2*sp, each document one contiguous run, padding its own document): the order in
    which to lay the rows out so that the zigzag split gives every rank about the same visible
    (query, key) pairs, whatever the documents' lengths.

    Each rank takes S/sp tokens. A document longer than a quarter of a chunk (c = S/2sp tokens;
    or `long_doc`) is cut into 2*sp consecutive pieces and rank r takes pieces r and 2sp-1-r: the zigzag within
    the document, so its causal work splits evenly (TransformerEngine's per-sequence split for
    THD, without padding each document to a multiple of 2*sp). Shorter documents go whole to the
    least-loaded rank with room (longest first), and when no rank has room for the rest of one,
    it is cut at the room there is. Rank r's tokens then fill chunks r and 2sp-1-r. The rows are
    no longer in sequence order: attention must mask by (document, position within it), which
    parallel/blocks.Documents does when given the positions. The split within a document balances
    both sides' counts (`side`: which one the returned work and the short documents' placement use)."""
    ids = docs.cpu().numpy()
    B, S = ids.shape
    if S % (2 * sp):
        raise ValueError(f"rows of {S} tokens: pad to a multiple of 2 x sp={sp} first")
    cap, c = S // sp, S // (2 * sp)
    long_doc = c // 4 if long_doc is None else long_doc
    perms, work = [], np.zeros(sp)
    for row in ids:
        runs = sorted(_runs(row), key=lambda ab: ab[0] - ab[1])  # longest first
        taken: list[list[np.ndarray]] = [[] for _ in range(sp)]
        room = np.full(sp, cap)

        def give(r: int, start: int, stop: int, first: int, n: int) -> None:
            m, j0 = stop - start, start - first  # positions j0 .. j0+m-1 of a document of n tokens
            taken[r].append(np.arange(start, stop))
            room[r] -= m
            seen = m * j0 + m * (m + 1) / 2  # each query sees j + 1 keys
            work[r] += seen if side == "query" else m * (n + 1) - seen  # each key is seen by n - j queries

        for a, b in runs:
            n = b - a
            if n > long_doc and n >= 2 * sp:
                sizes = [n // (2 * sp) + (k < n % (2 * sp)) for k in range(2 * sp)]
                need = [sizes[r] + sizes[2 * sp - 1 - r] for r in range(sp)]
                if all(room[r] >= need[r] for r in range(sp)):
                    at = a
                    for k, m in enumerate(sizes):
                        give(k if k < sp else 2 * sp - 1 - k, at, at + m, a, n)
                        at += m
                    continue
            at = a
            while at < b:
                open_ranks = [r for r in range(sp) if room[r] > 0]
                fits = [r for r in open_ranks if room[r] >= b - at]
                r = min(fits, key=lambda r: work[r]) if fits else max(open_ranks, key=lambda r: room[r])
                m = min(int(room[r]), b - at)
                give(r, at, at + m, a, n)
                at += m
        perm = np.empty(S, dtype=np.int64)
        for r in range(sp):
            mine = np.concatenate(sorted(taken[r], key=lambda t: int(t[0])))
            perm[r * c:(r + 1) * c] = mine[:c]
            perm[(2 * sp - 1 - r) * c:(2 * sp - r) * c] = mine[c:]
        perms.append(perm)
    return torch.as_tensor(np.stack(perms)), work
