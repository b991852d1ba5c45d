"""What vocabulary parallelism (parallel.vocab_parallel, parallel/vocab.py) holds on one rank, for
the memory model (estimate.py): the rows of each vocabulary weight and the transient buffers of
the embedding and the loss head, by variant. Plain numbers in, bytes out (memory/ does not import
parallel/: the communication byte model stays in parallel/vocab.py).

Every buffer is fp32: the vocabulary weights are fp32 masters (FSDP2 ignores them, so no bf16
copies), the hidden states reaching the loss are the residual stream's fp32 (the final norm
keeps its input's dtype), and the accumulators are fp32 by construction. `auto` may run either
variant: it is charged the larger.
"""

from __future__ import annotations

SLAB_BYTES = 3 * 4 * (1 << 22)  # a shard's [tokens, rows] fp32 chunk (parallel/vocab.py SLAB_ELEMENTS) and companions


def rows_per_rank(vocab: int, group: int) -> int:
    """Rows of each vocabulary weight one rank holds: ceil(V/P) (torch.chunk's split)."""
    return -(-vocab // group)


def _slab(tokens: int, rows: int) -> float:
    return float(min(3 * 4 * tokens * rows, SLAB_BYTES))


def head_transient_bytes(variant: str, tokens: int, rows: int, hidden: int, group: int) -> float:
    """The loss head's buffers during one call on `tokens` tokens of this rank (a tile of the head):
    stream: the shard being computed and the one arriving (padded to `rows`), this rank's fp32
    dWeight part, the accumulator arriving on the return channel and the one still leaving (the
    part is computed while the accumulator travels), and one CCE chunk;
    gather: the group's hidden states [P x tokens, D] (saved for backward), their fp32 dHidden,
    its copy scattered to the group's order and the reduce-scatter's receive buffer (all live
    together in backward), the shard's fp32 dWeight and one CCE chunk over the group's tokens."""
    if variant == "auto":
        return max(head_transient_bytes(v, tokens, rows, hidden, group) for v in ("gather", "stream"))
    shard = 4.0 * rows * hidden
    if variant == "stream":
        return 2 * shard + 3 * shard + _slab(tokens, rows)
    group_tokens = group * tokens
    return 4.0 * group_tokens * hidden * (1 + 3) + shard + _slab(group_tokens, rows)


def embedding_transient_bytes(variant: str, tokens: int, rows: int, hidden: int, group: int) -> tuple[float, float]:
    """(forward, backward) buffers of the embedding over this rank's `tokens` ids. stream: the shard
    being read and the one arriving, then the fp32 dWeight accumulator and the one arriving;
    gather: the rows looked up for the group's ids [P, tokens, D] and the reduce-scatter's receive
    buffer, then the group's output gradients [P, tokens, D] and the shard's fp32 dWeight."""
    if variant == "auto":
        both = [embedding_transient_bytes(v, tokens, rows, hidden, group) for v in ("gather", "stream")]
        return max(f for f, _ in both), max(b for _, b in both)
    shard = 4.0 * rows * hidden
    if variant == "stream":
        return 2 * shard, 2 * shard
    every = 4.0 * group * tokens * hidden
    return 2 * every, every + shard
