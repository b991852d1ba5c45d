"""Dataset decomposition: documents into power-of-two pieces, one bucket per length.

Pouransari et al., "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (arXiv 2405.13226), §2: a document's length is split by its binary representation,
each piece 2^i tokens long (+1 token read for the shifted target) goes to bucket D_i, so every
sequence comes from one document: no cross-document attention, no padding, no masks.

Conventions here: a document of n tokens has n-1 (input, target) transitions; piece k reads
tokens [s, s+L+1) and the next starts at s+L, so every transition is in exactly one piece.
Transitions beyond `max_len` are cut into max_len pieces (or, with `random_split`, into random
power-of-two lengths drawn with P(2^k) proportional to 2^(max-k) as the reference does, which gives
each length equal expected tokens). A remainder shorter than `min_len` is dropped (`short="drop"`,
the reference) or kept as a padded min_len piece whose padding is masked from the loss
(`short="pad"`). The index stores (start, length) offsets into the token array, never copies.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class Buckets:
    """Bucket length L -> piece starts and valid lengths (== L except padded short pieces)."""

    starts: dict[int, np.ndarray]
    lengths: dict[int, np.ndarray]
    transitions_total: int = 0
    transitions_dropped: int = 0
    pad_tokens: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def sizes(self) -> dict[int, int]:
        return {L: len(s) for L, s in sorted(self.starts.items())}

    @property
    def transitions_kept(self) -> int:
        return int(sum(int(v.sum()) for v in self.lengths.values()))


def _binary_pieces(n: int, min_len: int) -> tuple[list[int], int]:
    """Powers of two summing to n, largest first, stopping below min_len; returns (pieces, rest)."""
    pieces = []
    while n >= min_len:
        L = 1 << (n.bit_length() - 1)
        pieces.append(L)
        n -= L
    return pieces, n


def decompose(
    doc_starts: np.ndarray, doc_ends: np.ndarray, min_len: int, max_len: int, short: str = "drop",
    random_split: bool = False, seed: int = 0,
) -> Buckets:
    if not (is_power_of_two(min_len) and is_power_of_two(max_len) and min_len <= max_len):
        raise ValueError(f"min_len={min_len}, max_len={max_len}: both must be powers of two with min_len <= max_len")
    if short not in ("drop", "pad"):
        raise ValueError(f"short={short!r}: expected drop or pad")
    rng = np.random.default_rng(seed)
    log_min, log_max = min_len.bit_length() - 1, max_len.bit_length() - 1
    split_lengths = np.array([1 << k for k in range(log_min, log_max + 1)])
    split_odds = np.array([2.0 ** (log_max - k) for k in range(log_min, log_max + 1)])
    split_odds /= split_odds.sum()
    # typed arrays, 8 bytes a piece (a list of ints is ~36): the index of a large corpus stays small
    starts: dict[int, array] = {1 << k: array("q") for k in range(log_min, log_max + 1)}
    lengths: dict[int, array] = {L: array("q") for L in starts}
    total = dropped = pad = 0
    for doc_start, doc_end in zip(np.asarray(doc_starts).tolist(), np.asarray(doc_ends).tolist()):
        n = doc_end - doc_start - 1  # transitions in this document
        if n <= 0:
            continue
        total += n
        pos = doc_start
        pieces: list[int] = []
        while n > max_len:
            L = int(rng.choice(split_lengths, p=split_odds)) if random_split else max_len
            pieces.append(L)
            n -= L
        more, rest = _binary_pieces(n, min_len)
        pieces += more
        for L in pieces:
            starts[L].append(pos)
            lengths[L].append(L)
            pos += L
        if rest:
            if short == "pad":
                starts[min_len].append(pos)
                lengths[min_len].append(rest)
                pad += min_len - rest
            else:
                dropped += rest
    return Buckets(
        starts={L: np.frombuffer(v, dtype=np.int64).copy() for L, v in starts.items() if v},
        lengths={L: np.frombuffer(lengths[L], dtype=np.int64).copy() for L, v in starts.items() if v},
        transitions_total=total, transitions_dropped=dropped, pad_tokens=pad,
    )


def kept_transitions(lengths: np.ndarray, min_len: int, max_len: int) -> np.ndarray:
    """Transitions `decompose` keeps of documents of these token lengths (no random split, short
    remainders dropped): what each document trains under decomposition, for mixture weights."""
    n = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    full = np.where(n > max_len, -(-(n - max_len) // max_len), 0)  # max_len pieces cut while n > max_len
    rest = n - full * max_len
    return full * max_len + rest - rest % min_len


def gather_rows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, L: int, pad_id: int,
                ignore_index: int = -100, loss_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [B, L], labels [B, L]) for pieces; padding gets pad_id inputs and ignored labels, and
    so does every label whose token `loss_mask` marks 0 (the prompt side of chat records)."""
    B = len(starts)
    inputs = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), ignore_index, dtype=np.int64)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        piece = np.asarray(tokens[s : s + n + 1], dtype=np.int64)
        inputs[i, :n] = piece[:-1]
        labels[i, :n] = piece[1:]
        if loss_mask is not None:
            labels[i, :n][np.asarray(loss_mask[s + 1 : s + n + 1]) == 0] = ignore_index
    return inputs, labels


def attention_flops(lengths_and_counts: dict[int, int], heads_x_dim: int = 1) -> float:
    """Causal attention FLOPs (QK^T and PV, forward) of rows of the given lengths: 2 * L^2 * H*d each."""
    return float(sum(2 * L * L * heads_x_dim * count for L, count in lengths_and_counts.items()))


class DecomposedData:
    """Per-step batches for the trainer: the sampler picks (L, pieces), the index gives offsets.
    `loss_mask` (per token, or None) masks the labels of prompt tokens; `source_of` (token
    positions -> source index) and `source_names` give the per-source token counts of a step."""

    def __init__(self, tokens: np.ndarray, buckets: Buckets, sampler, pad_id: int, sp_rank: int = 0,
                 loss_mask: np.ndarray | None = None, source_of=None, source_names: list[str] | None = None) -> None:
        self.tokens, self.buckets, self.sampler, self.pad_id, self.sp_rank = tokens, buckets, sampler, pad_id, sp_rank
        self.loss_mask, self.source_of, self.source_names = loss_mask, source_of, source_names

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(inputs, labels, sp degree for this bucket) of this rank's rows."""
        L, pieces, sp_eff = self.sampler.batch_at(step, sp_rank=self.sp_rank)
        starts, lengths = self.buckets.starts[L][pieces], self.buckets.lengths[L][pieces]
        return (*gather_rows(self.tokens, starts, lengths, L, self.pad_id, loss_mask=self.loss_mask), sp_eff)

    def source_tokens(self, step: int) -> np.ndarray:
        """Input tokens per source drawn by the whole step (every rank's rows)."""
        L, pieces = self.sampler.step_rows(step)
        starts, lengths = self.buckets.starts[L][pieces], self.buckets.lengths[L][pieces]
        return np.bincount(self.source_of(starts), weights=lengths, minlength=len(self.source_names)).astype(np.int64)

    def describe(self) -> dict:
        b = self.buckets
        return {"buckets": {str(L): n for L, n in b.sizes.items()}, "steps_per_epoch": self.sampler.steps_per_epoch,
                "transitions_kept": b.transitions_kept, "transitions_dropped": b.transitions_dropped,
                "pad_tokens": b.pad_tokens}
