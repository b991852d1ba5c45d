"""Weighted mixtures of sources, with per-source upsampling of long documents.

Fu et al., "Data Engineering for Scaling Language Models to 128K Context" (arXiv 2402.10171):
context extension works best when long documents are upsampled *within* each source while the
sources keep their mixture. So a mixture is given as `data.sources: [{path, weight,
upsample_long: {min_len, factor}}]`, and one epoch's documents are chosen as:
  1. inside source s, a document of at least `min_len` tokens counts `factor` times;
  2. the source's (upsampled) tokens are scaled so its share of the epoch's tokens is
     weight_s / sum(weights); the epoch has as many tokens as the sources hold (sum T_s);
  3. each document's expected copies r_d (step 1 x step 2) become floor(r_d) copies plus one
     more, decided in a seeded order, whenever the source's running token debt of fractional
     parts reaches half the document: so each source's tokens stay within half a document of
     its share (sampling by count would miss it by many long documents), and a document with
     r_d >= 1 is always in.
The result is a list of document indices with repeats, which every batching (decompose, pack,
packed_docs) takes as it takes a plain corpus's documents; so the sampler draws by weight, and
resume is exact as before (the list is a function of the seed). A source weighted below its
natural share leaves out the same documents every epoch (raise its weight or give more epochs of
a larger corpus); the drawn share per source is logged per step (`source_tokens`).

`MixedStore` presents the sources' token stores (each tokenized and cached on its own) as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sources import DataError
from .tokenize import TokenStore


class _Concat:
    """Several 1-D arrays read as one by slices that lie inside one of them (a piece or a row
    never crosses a document, and so never a store)."""

    def __init__(self, parts: list[np.ndarray], starts: np.ndarray) -> None:
        self.parts, self.starts = parts, starts
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a mixed store is read by contiguous slices")
        lo, hi, _ = key.indices(len(self))
        k = int(np.searchsorted(self.starts, lo, side="right") - 1)
        if hi > self.starts[k + 1]:
            raise IndexError(f"slice [{lo}, {hi}) crosses from one source's tokens into the next")
        base = int(self.starts[k])
        return self.parts[k][lo - base : hi - base]


@dataclass
class MixedStore:
    """TokenStores of several sources as one store: documents numbered source after source."""

    tokens: np.ndarray | _Concat
    offsets: np.ndarray
    loss_mask: np.ndarray | _Concat | None
    doc_source: np.ndarray  # [documents] int: the source of each document
    names: list[str]

    @classmethod
    def of(cls, stores: list[TokenStore], names: list[str]) -> MixedStore:
        if len(stores) == 1:
            s = stores[0]
            return cls(s.tokens, s.offsets, s.loss_mask, np.zeros(s.num_documents, np.int64), names)
        sizes = np.array([int(s.offsets[-1]) for s in stores])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        offsets = np.concatenate([stores[0].offsets[:1]] + [s.offsets[1:] + starts[i] for i, s in enumerate(stores)])
        masks = None
        if any(s.loss_mask is not None for s in stores):
            masks = _Concat([s.loss_mask if s.loss_mask is not None else  # a text store: ones, zero-stride
                             np.broadcast_to(np.uint8(1), (len(s.tokens),)) for s in stores], starts)
        doc_source = np.repeat(np.arange(len(stores)), [s.num_documents for s in stores])
        return cls(_Concat([s.tokens for s in stores], starts), offsets, masks, doc_source, names)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, d: int) -> np.ndarray:
        return self.tokens[int(self.offsets[d]) : int(self.offsets[d + 1])]

    def document_mask(self, d: int) -> np.ndarray | None:
        return None if self.loss_mask is None else self.loss_mask[int(self.offsets[d]) : int(self.offsets[d + 1])]

    def target_tokens(self) -> list[int]:
        """Per source, the tokens that are training targets (every token of a text source)."""
        if self.loss_mask is None:
            return np.bincount(self.doc_source, weights=np.diff(self.offsets), minlength=len(self.names)).astype(int).tolist()
        parts = self.loss_mask.parts if isinstance(self.loss_mask, _Concat) else [self.loss_mask]
        return [int(np.count_nonzero(np.asarray(m))) for m in parts]

    def source_of_position(self, positions: np.ndarray) -> np.ndarray:
        """The source of the documents holding these token positions."""
        return self.doc_source[np.searchsorted(self.offsets, positions, side="right") - 1]


class DocumentList:
    """Documents `ids` of a store as a sequence of token arrays, each sliced when asked for: the
    batchings keep this, not one array view per document (~0.5 KB each, on every rank)."""

    def __init__(self, store, ids: np.ndarray, masks: bool = False) -> None:
        self.store, self.ids, self.masks = store, np.asarray(ids, dtype=np.int64), masks
        self.lengths = np.diff(store.offsets)[self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> np.ndarray:
        d = int(self.ids[k])
        return self.store.document_mask(d) if self.masks else self.store.document(d)

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def mixture_documents(lengths: np.ndarray, doc_source: np.ndarray, weights: list[float],
                      upsample: list[tuple[int, float]], seed: int) -> np.ndarray:
    """Document indices (into `lengths`) with repeats for one epoch (module docstring):
    `lengths` and `doc_source` per document, `weights` and `upsample` [(min_len, factor)] per source."""
    lengths, doc_source = np.asarray(lengths, np.float64), np.asarray(doc_source)
    n_sources = len(weights)
    natural = np.bincount(doc_source, weights=lengths, minlength=n_sources)
    empty = [s for s in range(n_sources) if natural[s] == 0]
    if empty:
        raise DataError(f"data.sources[{empty[0]}]: no training tokens in this source")
    boost = np.ones(len(lengths))
    for s, (min_len, factor) in enumerate(upsample):
        boost[(doc_source == s) & (lengths >= min_len)] = factor
    upsampled = np.bincount(doc_source, weights=lengths * boost, minlength=n_sources)
    share = np.asarray(weights, np.float64) / float(np.sum(weights))
    copies_expected = boost * (share * natural.sum() / upsampled)[doc_source]
    whole = np.floor(copies_expected)
    extra_tokens = (copies_expected - whole) * lengths  # what the fractional parts owe, in tokens
    order = np.random.default_rng([seed, 31]).permutation(len(lengths))
    out = whole.astype(np.int64)
    owed = np.zeros(n_sources)
    for d in order.tolist():  # one more copy when the source's running debt reaches half the document
        s = doc_source[d]
        owed[s] += extra_tokens[d]
        if extra_tokens[d] > 0 and owed[s] >= lengths[d] / 2:
            out[d] += 1
            owed[s] -= lengths[d]
    return np.repeat(np.arange(len(lengths)), out)


def source_shares(doc_source: np.ndarray, lengths: np.ndarray, documents: np.ndarray, n_sources: int) -> np.ndarray:
    """Token share per source of an epoch's documents (with repeats)."""
    tokens = np.bincount(doc_source[documents], weights=np.asarray(lengths, np.float64)[documents], minlength=n_sources)
    return tokens / max(tokens.sum(), 1.0)
