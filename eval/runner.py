"""An evaluation over cells ((task, length, depth), or a length for `ppl`), resumable per cell.

`DIR/results.json` holds the settings and one entry per finished cell (`length`, `depth` where it
applies, `score`: exact match of the answer for the tasks, mean next-token loss for ppl); it is
rewritten whole (a temporary file then a rename) after every cell, so a run stopped at any point
keeps what it finished and a rerun with the same settings does only the rest. Figures are drawn
from it at the end (`DIR/*.png`).

Under several processes: the sequence-parallel group runs each sample together (the scorer sums
over it); data-parallel groups take every dp_world-th sample (or document), and sums go over
`group` with only the first rank of each sequence-parallel group contributing. Every rank reads
DIR/results.json before the first cell, so DIR must be a folder every rank sees (as checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import plots
from .perplexity import PerplexityError, bucket_sums, long_documents, summarize
from .score import Scorer
from .tasks import SUITES, TASKS, Generator, TaskError

RESULTS = "results.json"
SUITE_NAMES = ("passkey", "niah", "ruler", "ppl")


class EvalError(ValueError):
    """Settings or an output folder that cannot be used, naming the option or file."""


@dataclass
class Settings:
    suite: str
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 1
    seed: int = 0
    tasks: list[str] = field(default_factory=list)  # empty: the suite's
    documents: int = 4  # ppl: documents per length
    bucket: int = 512  # ppl: positions per bucket
    label: str = ""
    model: str = ""
    overrides: list[str] = field(default_factory=list)  # recipe keys the model was built with

    def __post_init__(self) -> None:
        if self.suite not in SUITE_NAMES:
            raise EvalError(f"suite {self.suite!r}: expected one of {', '.join(SUITE_NAMES)}")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise EvalError(f"lengths {self.lengths}: expected one or more token counts of at least 2")
        if self.suite != "ppl" and (not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths)):
            raise EvalError(f"depths {self.depths}: expected fractions of the context in [0, 1]")
        if self.samples < 1 or self.documents < 1 or self.bucket < 1:
            raise EvalError(f"samples={self.samples}, documents={self.documents}, bucket={self.bucket}: expected >= 1")
        allowed = SUITES.get(self.suite, ())
        bad = [t for t in self.tasks if t not in allowed]
        if bad:
            raise EvalError(f"tasks {bad}: the {self.suite} suite has {', '.join(allowed) or 'no tasks'}")
        self.lengths = sorted(set(int(n) for n in self.lengths))
        self.depths = sorted(set(float(d) for d in self.depths)) if self.suite != "ppl" else []

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(self.tasks) or SUITES.get(self.suite, ())


@dataclass
class Ranks:
    dp_rank: int = 0
    dp_world: int = 1
    group: object | None = None  # sums over every rank
    contributes: bool = True  # the first rank of its sequence-parallel group
    is_main: bool = True


def parse_lengths(text: str) -> list[int]:
    """'4k,8k,16384' -> [4096, 8192, 16384] (k = 1024)."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        try:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
        except (ValueError, OverflowError):
            raise EvalError(f"--lengths: {item!r} is not a token count (a number, or with a k suffix: 4k = 4096)") from None
    return out


def parse_depths(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--depths: {text!r}: expected comma-separated fractions such as 0,0.5,1") from None


def _cells(s: Settings) -> list[tuple]:
    if s.suite == "ppl":
        return [("ppl", n, None) for n in s.lengths]
    return [(t, n, d) for t in s.task_list for n in s.lengths for d in s.depths]


def _key(cell: dict) -> tuple:
    return cell["task"], cell["length"], cell.get("depth")


def read_results(out: Path, settings: Settings | None = None) -> dict:
    path = out / RESULTS
    try:
        results = json.loads(path.read_text())
        results["settings"]["suite"], results["cells"]  # noqa: B018 - both must be there
    except FileNotFoundError:
        raise EvalError(f"{path}: not found (no evaluation was written to {out})") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: unreadable ({type(e).__name__}); move it away to start over") from None
    if settings is not None and results["settings"] != asdict(settings):
        theirs, ours = results["settings"], asdict(settings)
        diff = [k for k in ours if theirs.get(k) != ours[k]]
        raise EvalError(f"{path}: holds an evaluation with other settings ({', '.join(diff)}); resume with the same "
                        "options, or choose another --out")
    return results


def _write(out: Path, results: dict) -> None:
    part = out / (RESULTS + ".part")
    part.write_text(json.dumps(results, indent=1))
    os.replace(part, out / RESULTS)


def _reduce(values: list[float], ranks: Ranks, device) -> list[float]:
    t = torch.tensor(values if ranks.contributes else [0.0] * len(values), dtype=torch.float64, device=device)
    if ranks.group is not None:
        dist.all_reduce(t, group=ranks.group)
    return t.tolist()


def run(settings: Settings, scorer: Scorer, out: Path, generator: Generator | None = None,
        documents: list[np.ndarray] | None = None, ranks: Ranks = Ranks(), device="cpu", progress: bool = True,
        draw: bool = True) -> dict:
    """Runs the cells not yet in out/results.json; returns the results (every cell)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder")
    results = {"settings": asdict(settings), "cells": [], "complete": False}
    if (out / RESULTS).exists():
        results = read_results(out, settings)
    if settings.suite == "ppl" and documents is None:
        raise EvalError("ppl: no documents to evaluate")
    if settings.suite != "ppl" and generator is None:
        raise EvalError(f"{settings.suite}: no task generator")
    done = {_key(c) for c in results["cells"]}
    todo = [c for c in _cells(settings) if c not in done]
    _check(settings, generator, documents, todo)  # before anything is written
    if ranks.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / (RESULTS + ".part")).write_text("")
        except OSError as e:
            raise EvalError(f"--out {out}: cannot write there ({e.strerror})") from None
        if todo and done:
            print(f"[longctx] eval: {len(done)} cell(s) already in {out / RESULTS}; {len(todo)} to go", file=sys.stderr)
    bar = _bar(len(todo), settings.suite, progress and ranks.is_main)
    for task, length, depth in todo:
        t0 = time.perf_counter()
        if task == "ppl":
            cell = _ppl_cell(settings, scorer, documents, length, ranks, device)
        else:
            cell = _task_cell(settings, scorer, generator, task, length, depth, ranks, device)
        cell["seconds"] = round(time.perf_counter() - t0, 2)
        results["cells"].append(cell)
        if ranks.is_main:
            _write(out, results)
        bar.update(1)
        bar.set_postfix_str(f"{task} {length} {'' if depth is None else f'@{depth:g} '}score {cell['score']:.3f}")
    bar.close()
    results["complete"] = True
    if ranks.is_main:
        if draw:
            results["figures"] = [p.name for p in draw_figures(results, out)]
        _write(out, results)
    return results


def _check(s: Settings, generator: Generator | None, documents, todo: list[tuple]) -> None:
    """What would fail mid-way fails now: a length too short for a task, or longer than every document."""
    for task, length in dict.fromkeys((t, n) for t, n, _ in todo):
        try:
            if task == "ppl":
                long_documents(documents, length, 1)
            else:
                generator.sample(task, length, 0.5)
        except (PerplexityError, TaskError) as e:
            raise EvalError(str(e)) from None


def _bar(total: int, suite: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {suite}", unit="cell", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _task_cell(s: Settings, scorer: Scorer, generator: Generator, task: str, length: int, depth: float,
               ranks: Ranks, device) -> dict:
    sums = [0.0] * 5
    for i in range(ranks.dp_rank, s.samples, ranks.dp_world):
        sample = generator.sample(task, length, depth, i)
        r = scorer.answer(sample.prompt, sample.answer)
        for j, v in enumerate((float(r["exact"]), r["answer_logprob"], r["answer_token_logprob"],
                               r["answer_tokens_right"], 1.0)):
            sums[j] += v
    exact, logprob, token_logprob, right, n = _reduce(sums, ranks, device)
    return {"task": task, "length": length, "depth": depth, "score": exact / n, "answer_logprob": logprob / n,
            "answer_token_logprob": token_logprob / n, "answer_tokens_right": right / n, "samples": int(n)}


def _ppl_cell(s: Settings, scorer: Scorer, documents: list[np.ndarray], length: int, ranks: Ranks, device) -> dict:
    try:
        docs = long_documents(documents, length, s.documents)
    except PerplexityError as e:
        raise EvalError(str(e)) from None
    n_buckets = -(-length // s.bucket)
    sums, counts = np.zeros(n_buckets), np.zeros(n_buckets)
    for doc in docs[ranks.dp_rank::ranks.dp_world]:
        logp, _ = scorer.targets(torch.tensor(np.asarray(doc, dtype=np.int64)), 0)
        a, b = bucket_sums(logp, s.bucket)
        sums[:len(a)] += a
        counts[:len(b)] += b
    total = _reduce([*sums, *counts], ranks, device)
    entry = summarize(length, s.bucket, np.asarray(total[:n_buckets]), np.asarray(total[n_buckets:]), len(docs))
    return {"task": "ppl", **entry}


def draw_figures(results: dict, out: Path) -> list[Path]:
    s = results["settings"]
    name = s["label"] or Path(s["model"]).name or s["model"]
    cells = results["cells"]
    if s["suite"] == "ppl":
        series = [(f"{name} @ {_k(c['length'])}", c) for c in sorted(cells, key=lambda c: c["length"])]
        return [plots.loss_curves(series, out / "loss_by_position.png", f"{name}: loss by position")] if series else []
    panels = [(f"{name} {task}", [c for c in cells if c["task"] == task]) for task in dict.fromkeys(c["task"] for c in cells)]
    return [plots.heatmaps(panels, out / f"{s['suite']}_heatmap.png", f"{s['suite']}: {name}")] if panels else []


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def compare(folders: list[Path], out: Path, marks: tuple[int, ...] = ()) -> dict:
    """Several evaluations (their --out folders) on one figure: loss curves at each one's longest
    length, or one heatmap row per model (and task); writes out/compare.json and a PNG."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder")
    runs = [read_results(Path(f)) for f in folders]
    suites = {r["settings"]["suite"] for r in runs}
    if len(suites) != 1:
        raise EvalError(f"--compare: the folders hold different suites ({', '.join(sorted(suites))}); compare one at a time")
    suite = suites.pop()
    out.mkdir(parents=True, exist_ok=True)
    names = [r["settings"].get("label") or Path(str(r["settings"].get("model", ""))).name or f"model {i}"
             for i, r in enumerate(runs)]
    summary = {"suite": suite, "models": []}
    if suite == "ppl":
        series = []
        for name, r in zip(names, runs):
            if r["cells"]:
                longest = max(r["cells"], key=lambda c: c["length"])
                series.append((f"{name} @ {_k(longest['length'])}", longest))
            summary["models"].append({"label": name, "cells": r["cells"]})
        figure = plots.loss_curves(series, out / "compare_loss_by_position.png", "loss by position", marks)
    else:
        panels = []
        for name, r in zip(names, runs):
            for task in dict.fromkeys(c["task"] for c in r["cells"]):
                panels.append((f"{name} {task}", [c for c in r["cells"] if c["task"] == task]))
            summary["models"].append({"label": name, "cells": r["cells"],
                                      "mean_score": float(np.mean([c["score"] for c in r["cells"]])) if r["cells"] else math.nan})
        figure = plots.heatmaps(panels, out / f"compare_{suite}_heatmap.png", f"{suite}: {', '.join(names)}")
    summary["figure"] = figure.name
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["EvalError", "Ranks", "Settings", "TASKS", "compare", "draw_figures", "parse_depths", "parse_lengths",
           "read_results", "run"]
