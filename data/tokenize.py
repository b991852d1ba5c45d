"""Tokenisation into a disk cache of memory-mapped token arrays.

Documents are tokenised in batches by several processes (long documents in ~1 MB text pieces cut
at whitespace, so one huge record cannot stall the fast tokenizer), an eos id is appended to each,
and the result is stored as one uint32 token array plus document offsets under
`<cache>/tokens/<key>/`, where the key hashes the tokenizer files and the source's identity
(path, size and mtime, or package/hub name). A second run memory-maps the cached arrays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import DataError


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then bos/eos/pad. For tiny test models without a tokenizer folder."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259
    identity = "bytes-v1"

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
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(self._tok)
        digest = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt"):
            if (self.folder / name).is_file():
                digest.update(name.encode() + (self.folder / name).read_bytes())
        self.identity = "hf-" + digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False).input_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        return self._tok.decode(ids)

    def chat_wrap(self) -> tuple[str, str] | None:
        """The text the chat template puts before and after one user message, through the
        assistant's turn opening (None without a template): prompts are built as before + message
        + after, so the reply is what follows."""
        if not getattr(self._tok, "chat_template", None):
            return None
        mark = "\u0000MESSAGE\u0000"
        text = self._tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                             add_generation_prompt=True)
        before, found, after = text.partition(mark)
        return (before, after) if found else None


def load_tokenizer(kind: str, model_folder: str | Path | None):
    if kind == "bytes":
        return ByteTokenizer()
    folder = model_folder if kind == "auto" else kind
    if folder is None:
        raise DataError("model.tokenizer: no tokenizer folder to load")
    return HFTokenizer(folder)


def _split_text(text: str, piece_chars: int) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = text.rfind(" ", start, start + piece_chars)
        cut = start + piece_chars if cut <= start else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_documents(tokenizer, docs: list[str], piece_chars: int = 1 << 20) -> list[np.ndarray]:
    """One int32 array per document, eos appended."""
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


_WORKER_TOKENIZER = None


def _worker_init(kind: str, folder: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = ByteTokenizer() if kind == "bytes" else HFTokenizer(folder)


def _worker_tokenize(docs: list[str]) -> list[np.ndarray]:
    return tokenize_documents(_WORKER_TOKENIZER, docs)


@dataclass
class TokenStore:
    """All documents' tokens in one array; document d is tokens[offsets[d]:offsets[d+1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    @classmethod
    def from_arrays(cls, docs: list[np.ndarray]) -> TokenStore:
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        tokens = np.concatenate(docs).astype(np.uint32) if docs else np.zeros(0, np.uint32)
        return cls(tokens, offsets)


CACHE_FORMAT = 1


def cache_key(tokenizer_identity: str, source_identity: str) -> str:
    return hashlib.sha256(f"v{CACHE_FORMAT}|{tokenizer_identity}|{source_identity}".encode()).hexdigest()[:24]


def _read_cache(folder: Path) -> TokenStore:
    offsets = np.load(folder / "offsets.npy")
    tokens = np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r", shape=(int(offsets[-1]),))
    return TokenStore(tokens, offsets)


def _try_lock(f) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem cannot lock."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # some Lustre/NFS mounts have no flock
        return None


@contextlib.contextmanager
def _cache_lock(folder: Path, progress: bool):
    """An exclusive lock on `<folder>.lock` (flock): one process per cache entry tokenizes, the
    others wait here (no collective, so no collective timeout; a progress line every 30 s) and
    then read what it wrote. On a node-local cache each node's first process is its leader."""
    lock = folder.with_name(folder.name + ".lock")
    with open(lock, "a+") as f:
        t0 = last = time.time()
        while (got := _try_lock(f)) is False:
            if progress and time.time() - last >= 30:
                last = time.time()
                print(f"[longctx] waiting {last - t0:.0f}s for another process tokenizing into {folder}",
                      file=sys.stderr, flush=True)
            time.sleep(0.2)
        if got is None:
            print(f"[longctx] warning: {lock}: this filesystem cannot lock files; several processes may "
                  "tokenize this source at once", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            if got:
                fcntl.flock(f, fcntl.LOCK_UN)


def tokenize_to_cache(
    tokenizer, docs_fn, source_identity: str, cache_root: Path | None, num_proc: int = 1,
    batch_docs: int = 16, progress: bool = True,
) -> TokenStore:
    """Tokenises `docs_fn()` (called only on a cache miss, by one process per cache entry) into
    a TokenStore, cached under cache_root (see _cache_lock)."""
    if cache_root is None:
        return _tokenize(tokenizer, docs_fn(), num_proc, batch_docs, progress)[0]
    folder = Path(cache_root) / "tokens" / cache_key(tokenizer.identity, source_identity)
    if (folder / "meta.json").is_file():
        return _read_cache(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(folder, progress):
        if (folder / "meta.json").is_file():  # another process wrote it while we waited
            return _read_cache(folder)
        for stale in folder.parent.glob(folder.name + ".tmp*"):  # a crashed writer's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        store, seconds = _tokenize(tokenizer, docs_fn(), num_proc, batch_docs, progress)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir()
        store.tokens.tofile(tmp / "tokens.bin")
        np.save(tmp / "offsets.npy", store.offsets)
        (tmp / "meta.json").write_text(json.dumps({
            "tokenizer": tokenizer.identity, "source": source_identity, "documents": store.num_documents,
            "tokens": int(store.offsets[-1]), "seconds": round(seconds, 2),
        }))
        if folder.exists():  # an unfinished entry from before the lock existed
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return _read_cache(folder)


def _tokenize(tokenizer, docs, num_proc: int, batch_docs: int, progress: bool) -> tuple[TokenStore, float]:
    t0 = time.time()
    batches = [docs[i : i + batch_docs] for i in range(0, len(docs), batch_docs)]
    arrays: list[np.ndarray] = []
    if num_proc > 1 and len(batches) > 1:
        kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else "hf"
        init_args = (kind, str(getattr(tokenizer, "folder", "")) or None)
        with ProcessPoolExecutor(num_proc, initializer=_worker_init, initargs=init_args) as pool:
            for i, part in enumerate(pool.map(_worker_tokenize, batches)):
                arrays.extend(part)
                _progress(progress, i + 1, len(batches), t0)
    else:
        for i, batch in enumerate(batches):
            arrays.extend(tokenize_documents(tokenizer, batch))
            _progress(progress, i + 1, len(batches), t0)
    return TokenStore.from_arrays(arrays), time.time() - t0


def _progress(enabled: bool, done: int, total: int, t0: float) -> None:
    if enabled and (done == total or done % max(1, total // 10) == 0):
        print(f"[longctx] tokenizing: {done}/{total} batches, {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
