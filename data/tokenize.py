"""Tokenisation, streamed, into a disk cache of memory-mapped token arrays.

Records (plain-text documents, or chat conversations: data/chat.py) are read lazily from their
source (data/sources.iter_records), tokenised in batches by several processes with a bounded
number of batches in flight (long text documents in ~1 MB pieces cut at whitespace, so one huge
record cannot stall the fast tokenizer), an eos id appended to each text document, and appended
to one token file as they come. So RAM while tokenising holds a few batches, not the corpus, and
the store is written as:
  tokens.bin   uint16 when the vocabulary fits (SmolLM2, Llama-2, Mistral-7B), else uint32
  mask.bin     uint8 per token, only when some record is a chat: 1 = the token is a training
               target (an assistant turn's), 0 = prompt (system, user, tool, template markup)
  offsets.npy  document d is tokens[offsets[d]:offsets[d+1]]
under `<cache>/tokens/<key>/`, where the key hashes the tokenizer files and the source's identity
(path, size and mtime; package version; hub name and pinned revision). A second run memory-maps
the arrays, so training reads only the pages its rows touch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import chat
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


def _library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("tokenizers", "transformers", "jinja2"):
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return ";".join(found)


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
        # the chat template decides chat records' tokens and masks: it is part of the identity
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                     "chat_template.jinja", "chat_template.json"):
            if (self.folder / name).is_file():
                digest.update(name.encode() + (self.folder / name).read_bytes())
        # so is the code that applies them: the tokenizers library, transformers' template
        # rendering and jinja2 (an upgrade tokenizes again rather than reuse another's tokens)
        digest.update(_library_versions().encode())
        self.identity = "hf-" + digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False).input_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        return self._tok.decode(ids)

    def encode_chat(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of one conversation rendered by the model's own chat template (data/chat.py)."""
        return chat.encode(self._tok, messages, self.folder)

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
    """One int64 array per document, eos appended."""
    out = []
    for doc in docs:
        if isinstance(tokenizer, ByteTokenizer):  # the bytes are the ids
            out.append(np.append(np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.int64), tokenizer.eos_token_id))
            continue
        pieces = _split_text(doc, piece_chars)
        if hasattr(tokenizer, "encode_batch"):
            ids = [i for piece in tokenizer.encode_batch(pieces) for i in piece]
        else:
            ids = [i for piece in pieces for i in tokenizer.encode(piece)]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def tokenize_records(tokenizer, records: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, mask) per record: a text document (mask None: every token a target) or a chat
    conversation (a list of messages; mask from the assistant turns, data/chat.py)."""
    out: list = [None] * len(records)
    texts = [i for i, r in enumerate(records) if isinstance(r, str)]
    for i, ids in zip(texts, tokenize_documents(tokenizer, [records[i] for i in texts])):
        out[i] = (ids, None)
    for i, r in enumerate(records):
        if not isinstance(r, str):
            if not hasattr(tokenizer, "encode_chat"):
                raise DataError("data: the source holds chat records (messages or prompt/response) but "
                                f"model.tokenizer {tokenizer.identity!r} has no chat template; use the model's tokenizer folder")
            try:
                out[i] = tokenizer.encode_chat(r)
            except chat.ChatError as e:
                first = next((m["content"] for m in r if m["role"] == "user"), "")
                raise DataError(f"data: a chat record (its first user message starts {first[:60]!r}): {e}") from None
    return out


_WORKER_TOKENIZER = None


def _worker_init(kind: str, folder: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = ByteTokenizer() if kind == "bytes" else HFTokenizer(folder)


def _worker_tokenize(records: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    return tokenize_records(_WORKER_TOKENIZER, records)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenStore:
    """All documents' tokens in one array; document d is tokens[offsets[d]:offsets[d+1]].
    `loss_mask` (uint8, one per token, None for plain text) is 0 where a token is never a
    training target: the prompt side of chat records."""

    tokens: np.ndarray
    offsets: np.ndarray
    loss_mask: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    def document_mask(self, d: int) -> np.ndarray | None:
        return None if self.loss_mask is None else self.loss_mask[self.offsets[d] : self.offsets[d + 1]]

    @classmethod
    def from_arrays(cls, docs: list[np.ndarray], masks: list[np.ndarray | None] | None = None,
                    dtype=np.uint32) -> TokenStore:
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
        mask = None
        if masks is not None and any(m is not None for m in masks):
            mask = np.concatenate([np.ones(len(d), np.uint8) if m is None else np.asarray(m, np.uint8)
                                   for d, m in zip(docs, masks)]) if docs else np.zeros(0, np.uint8)
        return cls(tokens, offsets, mask)


class _StoreWriter:
    """Appends tokenized records to tokens.bin (and mask.bin from the first chat record on,
    back-filled with ones for the text before it); keeps only the offsets in memory."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.tokens = open(folder / "tokens.bin", "wb")
        self.mask = None
        self.lengths: list[int] = []
        self.total = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and self.mask is None:
            self.mask = open(self.folder / "mask.bin", "wb")
            for start in range(0, self.total, 1 << 24):  # the text records before: every token a target
                self.mask.write(np.ones(min(1 << 24, self.total - start), np.uint8).tobytes())
        self.tokens.write(np.asarray(ids).astype(self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write((np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8)).tobytes())
        self.lengths.append(len(ids))
        self.total += len(ids)

    def close(self) -> np.ndarray:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        np.save(self.folder / "offsets.npy", offsets)
        return offsets


CACHE_FORMAT = 2  # 2: uint16 tokens when the vocabulary fits, mask.bin for chat records


def cache_key(tokenizer_identity: str, source_identity: str) -> str:
    return hashlib.sha256(f"v{CACHE_FORMAT}|{tokenizer_identity}|{source_identity}".encode()).hexdigest()[:24]


def _read_cache(folder: Path) -> TokenStore:
    offsets = np.load(folder / "offsets.npy")
    meta = json.loads((folder / "meta.json").read_text())
    n = int(offsets[-1])
    tokens = np.memmap(folder / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,)) if n else \
        np.zeros(0, np.dtype(meta["dtype"]))
    mask = None
    if (folder / "mask.bin").is_file():
        mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
    return TokenStore(tokens, offsets, mask)


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
    """Tokenises the records of `docs_fn()` (an iterable, consumed lazily; called only on a cache
    miss, by one process per cache entry) into a TokenStore cached under cache_root (see
    _cache_lock). Without a cache the store is written to a temporary folder that is removed
    once mapped (the mapping keeps the data until the store is dropped)."""
    if cache_root is None:
        tmp = Path(tempfile.mkdtemp(prefix="longctx-tokens-"))
        try:
            _write_store(tokenizer, docs_fn(), tmp, source_identity, num_proc, batch_docs, progress)
            return _read_cache(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    folder = Path(cache_root) / "tokens" / cache_key(tokenizer.identity, source_identity)
    if (folder / "meta.json").is_file():
        return _read_cache(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(folder, progress):
        if (folder / "meta.json").is_file():  # another process wrote it while we waited
            return _read_cache(folder)
        for stale in folder.parent.glob(folder.name + ".tmp*"):  # a crashed writer's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir()
        try:
            _write_store(tokenizer, docs_fn(), tmp, source_identity, num_proc, batch_docs, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.exists():  # an unfinished entry from before the lock existed
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return _read_cache(folder)


def _batches(records, batch_docs: int):
    it = iter(records)
    while batch := list(itertools.islice(it, batch_docs)):
        yield batch


def _write_store(tokenizer, records, folder: Path, source_identity: str, num_proc: int, batch_docs: int,
                 progress: bool) -> None:
    """Streams `records` through the tokenizer into `folder` (meta.json last: its presence means
    complete). At most 2 x num_proc batches are in flight, so memory does not grow with the corpus."""
    t0 = last = time.time()
    writer = _StoreWriter(folder, token_dtype(tokenizer.vocab_size))

    def write(part):
        nonlocal last
        for ids, mask in part:
            writer.add(ids, mask)
        if progress and time.time() - last >= 10:
            last = time.time()
            print(f"[longctx] tokenizing: {len(writer.lengths)} documents, {writer.total} tokens, "
                  f"{last - t0:.0f}s", file=sys.stderr, flush=True)

    if num_proc > 1:
        kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else "hf"
        init_args = (kind, str(getattr(tokenizer, "folder", "")) or None)
        with ProcessPoolExecutor(num_proc, initializer=_worker_init, initargs=init_args) as pool:
            pending: deque = deque()
            for batch in _batches(records, batch_docs):
                pending.append(pool.submit(_worker_tokenize, batch))
                if len(pending) >= 2 * num_proc:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
    else:
        for batch in _batches(records, batch_docs):
            write(tokenize_records(tokenizer, batch))
    offsets = writer.close()
    seconds = time.time() - t0
    if progress:
        print(f"[longctx] tokenized {len(offsets) - 1} documents, {int(offsets[-1])} tokens in {seconds:.1f}s",
              file=sys.stderr, flush=True)
    (folder / "meta.json").write_text(json.dumps({
        "tokenizer": tokenizer.identity, "source": source_identity, "documents": len(offsets) - 1,
        "tokens": int(offsets[-1]), "dtype": writer.dtype.name, "chat": writer.mask is not None,
        "seconds": round(seconds, 2),
    }))
