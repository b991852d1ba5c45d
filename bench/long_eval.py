"""Long-context evaluation of a RoPE extension (issue 22): SmolLM2-135M-Instruct (8K native) as it is,
with YaRN x2 and no training, and a fine-tuned model (the quickstart's export), on the same grid:
loss by position on the held-out Genesis to 16K (three 16K windows) and passkey / niah exact match
and answer log-likelihood at 2K-16K x depths. Each model is one `longctx eval` per suite (its
results.json and PNGs under OUT/<model>/<suite>/), then the three on one figure per suite
(OUT/compare-<suite>/). The baseline in the same run is the base model with its native RoPE: the
summary gives each model's loss past the native length and its scores relative to it.

  python -m longctx.bench.long_eval [--finetuned runs/quickstart/export] [--out DIR]
      [--lengths 2k,4k,8k,16k] [--depths 0,0.5,1] [--suites ppl,passkey,niah]

Reruns resume per cell (`longctx eval` does). Measured on this machine's CPU; forward only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

NATIVE = 8192
YARN = ["--set", "model.rope.type=yarn", "--set", "model.rope.factor=2", "--set", "model.max_seq_len=16384"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--finetuned", default="runs/quickstart/export")
    p.add_argument("--out", default="bench/results/cpu-long_eval-smollm2")
    p.add_argument("--lengths", default="2k,4k,8k,16k")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--suites", default="ppl,passkey,niah")
    p.add_argument("--ppl-length", default="16k")
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args()
    from longctx.cli import main as cli

    out = Path(args.out)
    models = [("base-native-rope", "default", []), ("base-yarn2", "default", YARN),
              ("finetuned", args.finetuned, [])]
    common = ["--set", f"run.dtype={args.dtype}"]
    summary = {"models": {}, "native_length": NATIVE, "dtype": args.dtype, "finetuned": args.finetuned}
    for suite in args.suites.split(","):
        for name, model, extra in models:
            grid = (["--lengths", args.ppl_length, "--documents", str(args.documents)] if suite == "ppl" else
                    ["--lengths", args.lengths, "--depths", args.depths])
            t0 = time.perf_counter()
            code = cli(["eval", suite, model, *grid, *common, *extra, "--label", name, "--out",
                        str(out / name / suite)])
            if code:
                raise SystemExit(f"longctx eval {suite} {model} exited {code}")
            results = json.loads((out / name / suite / "results.json").read_text())
            entry = summary["models"].setdefault(name, {"model": model, "settings": extra})
            entry[suite] = _summarize(suite, results["cells"])
            entry[f"{suite}_seconds"] = round(time.perf_counter() - t0, 1)
        cli(["eval", suite, "--compare", *[str(out / n / suite) for n, _, _ in models], "--mark", str(NATIVE),
             "--out", str(out / f"compare-{suite}")])
    base = summary["models"].get("base-native-rope", {})
    for name, entry in summary["models"].items():
        if "ppl" in entry and "ppl" in base:
            entry["ppl"]["past_native_vs_base"] = round(entry["ppl"]["past_native"] - base["ppl"]["past_native"], 4)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def _summarize(suite: str, cells: list[dict]) -> dict:
    if suite == "ppl":
        c = max(cells, key=lambda c: c["length"])
        past = [b for b in c["by_position"] if b["start"] >= NATIVE]
        within = [b for b in c["by_position"] if b["end"] <= NATIVE]

        def mean(bs):
            return round(sum(b["loss"] * b["tokens"] for b in bs) / max(sum(b["tokens"] for b in bs), 1), 4)

        return {"length": c["length"], "loss": round(c["score"], 4), "within_native": mean(within),
                "past_native": mean(past), "documents": c["documents"]}
    by_length = {}
    for c in cells:
        by_length.setdefault(c["length"], []).append(c)
    return {str(n): {"exact": round(sum(c["score"] for c in cs) / len(cs), 3),
                     "answer_token_logprob": round(sum(c["answer_token_logprob"] for c in cs) / len(cs), 4)}
            for n, cs in sorted(by_length.items())}


if __name__ == "__main__":
    main()
