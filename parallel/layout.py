"""Zigzag layout of a sequence over sp ranks (DualChunkSwap / head-tail).

The sequence is cut into 2P chunks of c tokens; rank r holds chunks r and 2P-1-r, so under a
causal mask every rank does the same work. Position ids and (already shifted) labels are split
the same way. A length not divisible by 2P is padded at the end: pad positions come after every
real token, so causality already hides them from real queries, and their labels are ignored, so
they never reach the loss.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def padded_length(seq_len: int, sp: int) -> int:
    return -(-seq_len // (2 * sp)) * (2 * sp)


def chunk_ids(rank: int, sp: int) -> tuple[int, int]:
    return rank, 2 * sp - 1 - rank


def split(x: torch.Tensor, rank: int, sp: int, dim: int = 1, pad_value=0) -> torch.Tensor:
    """This rank's zigzag shard of x along `dim` (padded to a multiple of 2*sp with pad_value)."""
    S = x.shape[dim]
    total = padded_length(S, sp)
    if total != S:
        pad_shape = list(x.shape)
        pad_shape[dim] = total - S
        x = torch.cat([x, torch.full(pad_shape, pad_value, dtype=x.dtype, device=x.device)], dim=dim)
    chunks = x.chunk(2 * sp, dim=dim)
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
