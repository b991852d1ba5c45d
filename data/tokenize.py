"""Tokenisation: HF tokenizers from a model folder, or a built-in byte tokenizer for tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .sources import DataError


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then bos/eos/pad. For tiny test models without a tokenizer folder."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise DataError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e})") from None
        self.folder = Path(folder)
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False).input_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        return self._tok.decode(ids)


def load_tokenizer(kind: str, model_folder: str | Path | None):
    if kind == "bytes":
        return ByteTokenizer()
    folder = model_folder if kind == "auto" else kind
    if folder is None:
        raise DataError("model.tokenizer: no tokenizer folder to load")
    return HFTokenizer(folder)


def tokenize_documents(tokenizer, docs: list[str], piece_chars: int = 1 << 20) -> list[np.ndarray]:
    """One int32 array per document, eos appended. Long documents are encoded in ~1 MB pieces
    split at whitespace so one huge record cannot stall the fast tokenizer."""
    out = []
    for doc in docs:
        pieces = _split_text(doc, piece_chars)
        if hasattr(tokenizer, "encode_batch"):
            ids = [i for piece in tokenizer.encode_batch(pieces) for i in piece]
        else:
            ids = [i for piece in pieces for i in tokenizer.encode(piece)]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        out.append(np.asarray(ids, dtype=np.int32))
    return out


def _split_text(text: str, piece_chars: int) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = text.rfind(" ", start, start + piece_chars)
        cut = start + piece_chars if cut <= start else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
