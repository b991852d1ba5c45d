"""One benchmark case in a fresh Python process (peak RSS and allocator state are per process)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys


def run_case(module: str, args: list[str], labels: dict) -> dict:
    """Runs `python -m module *args`, whose last stdout line is the case's JSON object; on failure
    the row is `labels` with the last line of stderr as `error`. Adds the machine."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if out.returncode != 0:
        row = {**labels, "error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    else:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    row["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(json.dumps(row), flush=True)
    return row
