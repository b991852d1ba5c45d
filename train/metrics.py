"""Metric sinks: console progress, metrics.jsonl and W&B (offline unless a key is configured)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """Progress lines. With dataset decomposition a step's tokens are fixed but its length is
    not (the curriculum draws short buckets first), so the ETA sums a per-step time fitted to the
    recent steps as a + b * length (attention's work per token grows with the length) over the
    lengths the remaining steps will draw (`length_of(step)`, 1-based; None = equal steps)."""

    def __init__(self, max_steps: int, stream=None, length_of=None) -> None:
        self.max_steps, self.stream, self.length_of = max_steps, stream, length_of
        self.step_seconds: list[float] = []
        self.lengths: list[int] = []

    def eta_seconds(self, step: int) -> float:
        recent, lengths = self.step_seconds[-20:], self.lengths[-20:]
        mean = sum(recent) / len(recent)
        if self.length_of is None:
            return mean * (self.max_steps - step)
        mx = sum(lengths) / len(lengths)
        spread = sum((x - mx) ** 2 for x in lengths)
        # least squares seconds = mean + slope * (L - mean L); no spread of lengths yet: slope 0
        slope = max(sum((x - mx) * (y - mean) for x, y in zip(lengths, recent)) / spread, 0.0) if spread else 0.0
        return sum(max(mean + slope * (self.length_of(s) - mx), 0.0) for s in range(step + 1, self.max_steps + 1))

    def log(self, record: dict) -> None:
        self.step_seconds.append(record["step_seconds"])
        self.lengths.append(record.get("seq_len", 0))
        eta = self.eta_seconds(record["step"])
        loss = record["loss"]
        line = (
            f"step {record['step']}/{self.max_steps} | loss {_number(loss, '.4f', record.get('skipped'))} | "
            f"{record['tokens_per_second']:.0f} tok/s | lr {record['lr']:.2e} | "
            f"peak {record['peak_memory_bytes'] / 2**30:.2f} GiB | ETA {_format_seconds(eta)}"
        )
        if "eval_loss_before" in record:
            line += f" | eval before {_number(record['eval_loss_before'], '.4f', 'no label')}"
        if "eval_loss" in record:
            line += f" | eval {_number(record['eval_loss'], '.4f', 'no label')}"
        for key in sorted(k for k in record if k.startswith("eval/") and k.endswith("/score")):
            line += f" | {key[5:-6]} {record[key]:.3f}"
        if "seq_len" in record:
            line += f" | {record['rows']}x{record['seq_len']}"
        print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def _number(value, spec: str, missing: str | None) -> str:
    """A figure for the progress line; a missing one (a skipped step, an eval without labels) as -."""
    return format(value, spec) if value is not None else f"- ({missing or 'none'})"


def _finite(value):
    """JSON has no NaN or Infinity (json.dumps would write them, and strict readers, jq among
    them, reject the line): a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Jsonl:
    """metrics.jsonl: one run's records. `after_step` (a resumed run) drops records past it, so
    a resumed run appends without repeating the steps it redoes."""

    def __init__(self, path: Path, after_step: int | None = None) -> None:
        if after_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _step(line) <= after_step]
            part = path.with_suffix(".part")
            part.write_text("".join(line + "\n" for line in kept))
            os.replace(part, path)
        self.file = open(path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def close(self) -> None:
        self.file.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


def wandb_mode() -> str:
    """online only when a key is configured (env or netrc); WANDB_MODE, when set, wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandB:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict, run_id: str | None = None) -> None:
        import wandb

        self.mode = wandb_mode()
        # one W&B run per run folder: a resumed run continues it (same id) instead of starting another
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), config=config, mode=self.mode, id=run_id,
            resume="allow" if run_id else None, settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def log_eval(self, step: int, suite: str, results: dict, folder: Path) -> None:
        """An evaluation's figures as images and its cells as a table."""
        import wandb

        cells = results["cells"]
        columns = sorted({k for c in cells for k in c if not isinstance(c[k], (list, dict))})
        payload = {f"eval/{suite}/cells": wandb.Table(columns=columns, data=[[c.get(k) for k in columns] for c in cells])}
        for name in results.get("figures", []):
            payload[f"eval/{suite}/{Path(name).stem}"] = wandb.Image(str(folder / name))
        self.run.log(payload, step=step)

    def close(self) -> None:
        self.run.finish()


class Metrics:
    def __init__(self, sinks: list) -> None:
        self.sinks = sinks
        self.started = time.time()

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def log_eval(self, step: int, suite: str, results: dict, folder: Path) -> None:
        for sink in self.sinks:
            if hasattr(sink, "log_eval"):
                sink.log_eval(step, suite, results, folder)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
