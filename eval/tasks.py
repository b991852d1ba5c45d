"""Synthetic long-context tasks, generated offline and seeded: (prompt ids, answer ids) of an exact
total length with the asked-for fact (the "needle") at an asked-for depth of the context.

- passkey: a number hidden in repeated filler sentences (Mohtashami & Jaggi, arXiv 2305.16300).
- niah: one "special magic number" sentence in real text, the needle-in-a-haystack sweep of
  length x depth (G. Kamradt's test; the haystack here is the default corpus or any token stream).
- RULER-style (Hsieh et al., arXiv 2404.06654): niah_single (noise filler), niah_multikey (the
  asked key among distractor keys), niah_multivalue (one key, several values: all are asked),
  niah_multiquery (several keys asked at once), variable_tracking (a chain VAR A = n, VAR B = VAR A,
  ...: every name holding n is asked).

The prompt is intro + context (filler with the needles) + question + the start of the answer
("The pass key is"), inside the tokenizer's chat template when it has one; the answer is what the
model should continue with. The depth is that of the asked needle (for variable tracking, the
chain's first link): it starts at the sentence end nearest filler token round(depth * filler
tokens), within SNAP_TOKENS (else exactly there), so no needle splits a word. Other needles
go at seeded random depths (a chain's later links after its first). Every piece is tokenized on its
own and the ids are concatenated, so the needle's tokens and position are known exactly.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

PASSKEY = "passkey"
NIAH = "niah"
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
TASKS = (PASSKEY, NIAH, *RULER_TASKS)
SUITES = {"passkey": (PASSKEY,), "niah": (NIAH,), "ruler": RULER_TASKS}

NOISE = "The river runs down to the sea. The hills stand where they stood. A bird sings and the day goes on. "
_INTRO = {
    "passkey": "Somewhere in the long text below there is a pass key. Read everything, find it and keep it in mind: "
               "you will be asked for it at the end.\n\n",
    "niah": "Somewhere in the long text below there are special magic numbers. Find them and keep them in mind: "
            "you will be asked about them at the end.\n\n",
    "variable_tracking": "Memorize and track the chain of variable assignments hidden in the text below.\n\n",
}
# keys for the needles: plain words, distinct after tokenization by any tokenizer
_KEYS = ("apple", "harbor", "violet", "lantern", "meadow", "copper", "falcon", "willow", "garnet", "thunder",
         "orchard", "pebble", "saffron", "compass", "glacier", "tulip", "anchor", "ember", "juniper", "marble",
         "quartz", "raven", "sparrow", "timber", "velvet", "walnut", "zephyr", "cinder", "dune", "fjord")
SNAP_TOKENS = 32  # a needle goes at the nearest sentence end within this many filler tokens of its depth
_NEEDLES = 4  # needles of the multi-needle tasks; queries of niah_multiquery: 2; chain links: 4


class TaskError(ValueError):
    """A task, length or depth that cannot be generated, naming what is allowed."""


@dataclass
class Sample:
    task: str
    length: int  # len(prompt) + len(answer)
    depth: float
    index: int  # the sample's number within its (task, length, depth) cell
    prompt: list[int]
    answer: list[int]
    answer_text: str
    needle_at: int  # where the asked needle's tokens start in the prompt
    needle: list[int] = field(repr=False)  # the asked needle's tokens
    context: tuple[int, int] = (0, 0)  # the prompt's span of filler and needles


def _number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _var_name(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), 5))


def _spec(task: str, rng: np.random.Generator) -> tuple[str, list[str], int, str, str, bool]:
    """(intro, needles, index of the asked one, question, answer start, real-text filler?), answer."""
    if task == PASSKEY:
        n = _number(rng, 6)
        return (_INTRO["passkey"], [f" The pass key is {n}. Remember it: {n} is the pass key."], 0,
                "What is the pass key?", "The pass key is", False), f" {n}"
    keys = [str(k) for k in rng.choice(_KEYS, _NEEDLES, replace=False)]
    values = [_number(rng, 7) for _ in range(_NEEDLES)]

    def needle(k: str, v: str) -> str:
        return f" One of the special magic numbers for {k} is: {v}."

    if task in (NIAH, "niah_single"):
        k, v = keys[0], values[0]
        return (_INTRO["niah"], [needle(k, v)], 0, f"What is the special magic number for {k} mentioned in the text?",
                f"The special magic number for {k} is:", task == NIAH), f" {v}"
    if task == "niah_multikey":  # the asked key first; the others are distractors
        asked = 0
        return (_INTRO["niah"], [needle(k, v) for k, v in zip(keys, values)], asked,
                f"What is the special magic number for {keys[asked]} mentioned in the text?",
                f"The special magic number for {keys[asked]} is:", True), f" {values[asked]}"
    if task == "niah_multivalue":  # one key, several values; the answer lists them in text order (set later)
        k = keys[0]
        return (_INTRO["niah"], [needle(k, v) for v in values], 0,
                f"What are all the special magic numbers for {k} mentioned in the text?",
                f"The special magic numbers for {k} are:", True), ""
    if task == "niah_multiquery":
        asked = keys[:2]
        return (_INTRO["niah"], [needle(k, v) for k, v in zip(keys, values)], 0,
                f"What are the special magic numbers for {asked[0]} and {asked[1]} mentioned in the text?",
                f"The special magic numbers for {asked[0]} and {asked[1]} are:", True), \
            f" {values[0]}, {values[1]}"
    if task == "variable_tracking":
        n = _number(rng, 5)
        names = []
        while len(names) < _NEEDLES:
            name = _var_name(rng)
            if name not in names:
                names.append(name)
        links = [f" VAR {names[0]} = {n}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (_INTRO["variable_tracking"], links, 0,
                f"Find all variables that are assigned the value {n} in the text above.",
                f"According to the chain of assignments, {len(names)} variables are assigned the value {n}; they are:",
                False), " " + " ".join(names)
    raise TaskError(f"task {task!r}: expected one of {', '.join(TASKS)}")


def _snap(cut: int, ends: np.ndarray) -> int:
    """The sentence end nearest `cut` within SNAP_TOKENS of it, else `cut` itself."""
    best = int(ends[np.argmin(np.abs(ends - cut))])
    return best if abs(best - cut) <= SNAP_TOKENS else cut


class Generator:
    """Builds samples with one tokenizer (encode/decode; `chat_wrap()` when it has a template).

    `haystack`: a token stream of real text for the needle tasks (the default corpus); the noise
    filler is used without one. Deterministic: a sample depends only on (seed, task, length, depth,
    index)."""

    def __init__(self, tokenizer, haystack: np.ndarray | None = None, seed: int = 0, chat: bool = True) -> None:
        self.tok, self.seed = tokenizer, seed
        wrap = tokenizer.chat_wrap() if chat and hasattr(tokenizer, "chat_wrap") else None
        self.before, self.after = ([tokenizer.encode(t) for t in wrap] if wrap else ([], []))
        self.haystack = None if haystack is None else np.asarray(haystack, dtype=np.int64)
        if self.haystack is not None and len(self.haystack) == 0:
            raise TaskError("haystack: no tokens")
        self._noise = np.asarray(tokenizer.encode(NOISE * 8), dtype=np.int64)

    def _filler(self, n: int, real: bool, rng: np.random.Generator) -> np.ndarray:
        if real and self.haystack is not None:
            stream = self.haystack
            start = int(rng.integers(0, len(stream))) if len(stream) > n else 0
        else:
            stream, start = self._noise, 0
        reps = -(-(start + n) // len(stream))
        return np.tile(stream, reps)[start:start + n] if reps > 1 else stream[start:start + n]

    def _sentence_ends(self, filler: np.ndarray) -> np.ndarray:
        """Filler offsets right after a token that ends a sentence (where a needle may go)."""
        pieces = [self.tok.decode([int(t)]) for t in filler]
        return np.asarray([i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "!", "?", ";", ":"))]
                          + [0, len(filler)], dtype=np.int64)

    def sample(self, task: str, length: int, depth: float, index: int = 0) -> Sample:
        if task not in TASKS:
            raise TaskError(f"task {task!r}: expected one of {', '.join(TASKS)}")
        if not 0.0 <= depth <= 1.0:
            raise TaskError(f"depth {depth}: expected a fraction of the context in [0, 1]")
        rng = np.random.default_rng([self.seed, TASKS.index(task), length, int(round(depth * 10_000)), index])
        (intro, needles, asked, question, answer_start, real), answer_text = _spec(task, rng)
        enc = self.tok.encode
        if task == "variable_tracking":  # the chain in order: its first link at the depth, the rest after it
            depths = [depth] + sorted(rng.uniform(depth, 1.0, len(needles) - 1).tolist())
        else:
            depths = [float(d) for d in rng.uniform(0.0, 1.0, len(needles))]
            depths[asked] = depth
        order = sorted(range(len(needles)), key=lambda i: (depths[i], i))  # text order (cuts are monotone)
        if task == "niah_multivalue":  # every value, in the order they appear
            answer_text = " " + ", ".join(needles[i].rstrip(".").rsplit(" ", 1)[-1] for i in order)
        needle_ids = [enc(n) for n in needles]
        head = self.before + enc(intro)
        tail = enc("\n\n" + question) + self.after + enc(answer_start)
        answer = enc(answer_text)
        n_fill = length - len(head) - sum(map(len, needle_ids)) - len(tail) - len(answer)
        if n_fill < 1:
            raise TaskError(f"length {length}: too short for task {task} (at least {length - n_fill + 1} tokens "
                            "with this tokenizer)")
        filler = self._filler(n_fill, real, rng)
        ends = self._sentence_ends(filler)
        context: list[int] = []
        at, prev = {}, 0
        for i in order:
            cut = max(prev, _snap(int(round(depths[i] * n_fill)), ends))
            context += filler[prev:cut].tolist()
            at[i] = len(head) + len(context)
            context += needle_ids[i]
            prev = cut
        context += filler[prev:].tolist()
        prompt = head + context + tail
        return Sample(task, len(prompt) + len(answer), depth, index, prompt, answer, answer_text, at[asked],
                      needle_ids[asked], (len(head), len(head) + len(context)))
