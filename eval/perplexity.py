"""Loss by position: the mean next-token loss of held-out long documents in buckets of positions.

For a document cut to L tokens, position t's loss is -log p(token t | tokens < t), t = 1 .. L-1;
bucket b holds positions [b * bucket, (b + 1) * bucket). A model that uses a long context has a
curve that keeps falling (or stays flat) to L; one that breaks past its trained length rises
there (the RoPE extension's perplexity curves of YaRN, arXiv 2309.00071, and LongLoRA).
"""

from __future__ import annotations

import numpy as np
import torch

from .score import Scorer


class PerplexityError(ValueError):
    pass


def long_documents(documents: list[np.ndarray], length: int, count: int) -> list[np.ndarray]:
    """The first `count` windows of `length` tokens: each document (in the order given) cut into
    non-overlapping windows (a 51K-token book gives three at 16K; a shorter one none)."""
    chosen = [np.asarray(d[i:i + length]) for d in documents for i in range(0, len(d) - length + 1, length)][:count]
    if not chosen:
        longest = max((len(d) for d in documents), default=0)
        raise PerplexityError(f"length {length}: no document has that many tokens (the longest has {longest}); "
                              "choose shorter lengths or another source")
    return chosen


def bucket_sums(logp: torch.Tensor, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(summed loss, token count) per bucket of positions, from log p of positions 1 .. L-1."""
    nll = (-logp.double().cpu()).numpy()
    positions = np.arange(1, len(nll) + 1)
    index = positions // bucket
    n = int(index[-1]) + 1
    return np.bincount(index, weights=nll, minlength=n), np.bincount(index, minlength=n).astype(np.float64)


def summarize(length: int, bucket: int, sums: np.ndarray, counts: np.ndarray, documents: int) -> dict:
    buckets = [{"start": b * bucket, "end": min((b + 1) * bucket, length), "loss": float(s / c), "tokens": int(c)}
               for b, (s, c) in enumerate(zip(sums, counts)) if c > 0]
    return {"length": length, "score": float(sums.sum() / counts.sum()), "documents": documents,
            "bucket_tokens": bucket, "by_position": buckets}


def loss_by_position(scorer: Scorer, documents: list[np.ndarray], length: int, bucket: int = 512) -> dict:
    """One process's (or one sequence-parallel group's) pass over `documents` at `length`."""
    sums = counts = None
    for doc in documents:
        logp, _ = scorer.targets(torch.tensor(np.asarray(doc[:length], dtype=np.int64)), 0)
        s, c = bucket_sums(logp, bucket)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    return summarize(length, bucket, sums, counts, len(documents))
