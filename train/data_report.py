"""`longctx data inspect`: what dataset decomposition does to a recipe's data, before training.

Length histogram, bucket sizes, tokens kept / dropped / padded, and causal-attention FLOPs per
epoch of decomposition vs concat-and-chunk at data.max_len (the same tokens either way); and what
whole-document packing would make of it (padding share, documents per row, attention FLOPs with
document masking).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.decompose import attention_flops, decompose
from ..data.mixture import source_shares
from ..data.pack_docs import pack_buckets, pack_documents
from ..data.tokenize import load_tokenizer
from ..models.config import ModelConfig
from ..models.hf import load_model_folder
from ..parallel.mesh import Mesh
from ..recipes.schema import Recipe, bucketed
from .build import epoch_documents, held_out_split, resolve_model_dir, token_store, trained_lengths


def inspect(recipe: Recipe) -> dict:
    import torch

    d = recipe.data
    mesh = Mesh(0, 1, 0, 1, None, torch.device("cpu"))
    model_dir = None if recipe.model.path is None else resolve_model_dir(recipe.model.path, mesh)
    cfg = ModelConfig(**recipe.model.config) if model_dir is None else load_model_folder(model_dir)
    tokenizer = load_tokenizer(recipe.model.tokenizer, model_dir)
    store = token_store(recipe, tokenizer, mesh)
    lengths = np.diff(store.offsets)
    histogram: dict[str, int] = {}
    for n in lengths.tolist():
        edge = 1 << max(0, (int(n) - 1).bit_length())
        histogram[f"<={edge}"] = histogram.get(f"<={edge}", 0) + 1
    b = decompose(store.offsets[:-1], store.offsets[1:], d.min_len, d.max_len, d.short_pieces, d.random_split,
                  seed=recipe.run.seed)
    per_token_dims = 2 * cfg.num_heads * cfg.head_dim * cfg.num_layers  # QK^T and PV, causal half
    dd = attention_flops(b.sizes, per_token_dims)
    concat_rows = b.transitions_kept // d.max_len
    cc = attention_flops({d.max_len: concat_rows}, per_token_dims)
    packed = packing_report(store, d.max_len if bucketed(recipe) else d.seq_len, recipe.run.seed, per_token_dims,
                            recipe.parallel.sp_degree)
    if d.batching == "packed_docs" and bucketed(recipe):  # the rows the curriculum draws from
        buckets = pack_buckets([store.document(i) for i in range(store.num_documents)], d.min_len, d.max_len,
                               seed=recipe.run.seed)
        packed["curriculum_buckets"] = {str(L): {k: b.stats()[k] for k in ("rows", "padding_fraction",
                                                                           "documents_per_row_mean")}
                                        for L, b in buckets.items()}
    out = {"packed_documents": packed}
    if d.sources:
        out["sources"] = sources_report(recipe, store)
    if store.loss_mask is not None:
        out["chat"] = {"train_on": d.train_on, "tokens": int(store.offsets[-1]),
                       "target_tokens": dict(zip(store.names, store.target_tokens()))}
    return out | {
        "documents": store.num_documents,
        "tokens": int(store.offsets[-1]),
        "document_length_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0][2:]))),
        "buckets": {str(L): {"pieces": n, "tokens": int(b.lengths[L].sum()), "rows_per_step": d.tokens_per_step // L}
                    for L, n in b.sizes.items()},
        "tokens_kept": b.transitions_kept, "tokens_dropped": b.transitions_dropped, "pad_tokens": b.pad_tokens,
        "attention_flops_per_epoch": {"decomposition": dd, "concat_and_chunk": cc,
                                      "concat_over_decomposition": round(cc / dd, 3) if dd else None},
    }


def sources_report(recipe: Recipe, store) -> dict:
    """Per source: documents, tokens, long documents upsampled, and its share of the tokens the
    training documents train, before and after the mixture (train/build.epoch_documents, which
    build_data uses: the held-out documents first, then the mixture of the rest)."""
    d = recipe.data
    lengths = trained_lengths(recipe, store)
    _, train = held_out_split(store.num_documents, recipe.run.seed, d.eval_fraction)
    epoch = epoch_documents(recipe, store, train)
    natural = source_shares(store.doc_source, lengths, train, len(store.names))
    mixed = source_shares(store.doc_source, lengths, epoch, len(store.names))
    tokens = np.diff(store.offsets)
    out = {}
    for k, (name, s) in enumerate(zip(store.names, d.sources)):
        mine = store.doc_source == k
        long = mine & (lengths >= s.upsample_long.min_len) if s.upsample_long.min_len else np.zeros_like(mine)
        picked = store.doc_source[epoch] == k
        out[name] = {"documents": int(mine.sum()), "tokens": int(tokens[mine].sum()), "weight": s.weight,
                     "natural_share": round(float(natural[k]), 4), "epoch_share": round(float(mixed[k]), 4),
                     "long_documents": int(long.sum()),
                     "epoch_documents": int(picked.sum()),
                     "epoch_long_token_share": round(float(lengths[epoch][picked & long[epoch]].sum()
                                                           / max(lengths[epoch][picked].sum(), 1)), 4)}
    return out


def packing_report(store, seq_len: int, seed: int, per_token_dims: int, sp: int = 1, sample_rows: int = 64) -> dict:
    """What whole-document packing (data/pack_docs.py) makes of the corpus at rows of `seq_len`:
    padding share, documents per row, and the attention FLOPs with document masking over those
    of the same rows attended across documents (concat-and-chunk's cost per row); at sp > 1, how
    unbalanced the zigzag split leaves the ranks' visible pairs on up to `sample_rows` rows (one
    row per step), and what the trainer's reordering and balanced layout make of it."""
    packed = pack_documents([store.document(i) for i in range(store.num_documents)], seq_len, seed=seed)
    pieces: dict[int, int] = {}
    for r in range(packed.num_rows):
        for n in np.diff(packed.cu_seqlens(r)).tolist():
            pieces[n] = pieces.get(n, 0) + 1
    masked = attention_flops(pieces, per_token_dims)
    rows = attention_flops({seq_len: packed.num_rows}, per_token_dims)
    out = {**packed.stats(), "attention_flops_masked_over_rows": round(masked / rows, 4) if rows else None}
    if sp > 1:
        out["zigzag_balance"] = zigzag_balance(packed.take(np.arange(min(sample_rows, packed.num_rows)))[1], sp)
    return out


def zigzag_balance(doc_ids: np.ndarray, sp: int) -> dict:
    """Per row of document ids: the busiest rank's visible pairs over the mean, minus 1, under the
    plain zigzag split, after the trainer's reordering, and in the layout it trains with."""
    import torch

    from ..parallel import layout

    plain, reordered, used = [], [], []
    for row in doc_ids:
        ids = layout.pad(torch.as_tensor(row[None], dtype=torch.long), sp, pad_value=layout.PAD_DOCUMENT)
        _, before, after = layout.balance_documents(ids, sp)
        best = after
        if after > layout.BALANCE_THRESHOLD:
            best = min(after, layout.imbalance(layout.balanced_layout(ids, sp)[1]))
        plain.append(before)
        reordered.append(after)
        used.append(best)

    def summary(x):
        return {"mean": round(float(np.mean(x)), 4), "max": round(float(np.max(x)), 4)}

    return {"sp": sp, "rows": len(plain), "zigzag": summary(plain), "reordered": summary(reordered),
            "trained": summary(used), "rows_over_10pct_zigzag": int(sum(x > layout.BALANCE_THRESHOLD for x in plain))}


def save_png(report: dict, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install matplotlib") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist = report["document_length_histogram"]
    left.bar(range(len(hist)), list(hist.values()))
    left.set_xticks(range(len(hist)), list(hist), rotation=60, fontsize=7)
    left.set_title("documents by length (tokens)")
    buckets = report["buckets"]
    right.bar(range(len(buckets)), [v["tokens"] for v in buckets.values()])
    right.set_xticks(range(len(buckets)), list(buckets), rotation=60, fontsize=7)
    right.set_title("tokens per decomposition bucket")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
