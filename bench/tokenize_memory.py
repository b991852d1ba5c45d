"""Peak RAM of tokenizing and of training on a corpus larger than RAM should not grow with it (issue 23).

Writes synthetic jsonl corpora of the given sizes (words drawn from the default corpus's
vocabulary, documents of 1K-60K characters), then for each, in fresh processes:
  tokenize   the streaming tokenizer (data/tokenize.py) into an empty cache with SmolLM2's
             tokenizer and data.num_proc workers: peak RSS of the main process and of the
             largest worker (getrusage), seconds, tokens;
  train      training on the cached tokens: a small random model with the tokenizer's vocabulary,
             5 steps each with dataset decomposition, concat-and-chunk rows (pack) and packed
             documents (packed_docs, whose packing index grows with the rows): peak RSS.
Prints one JSON object per (corpus, phase) and a summary with the ratio of the largest corpus's
peak to the smallest's: flat means the ratio stays near 1 while the corpus grows 10x.

  python -m longctx.bench.tokenize_memory --tokenizer bytes   # 200 MB and 2 GB, ~15 minutes on 2 cores
  python -m longctx.bench.tokenize_memory --sizes-mb 20 200    # SmolLM2's tokenizer (2 GB takes about an hour)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> dict:
    from longctx.data.sources import default_corpus

    words = np.array(sorted({w for doc in default_corpus("book")[:10] for w in doc.split()}))
    rng = np.random.default_rng(seed)
    written = docs = 0
    with open(path, "w") as f:
        while written < size_bytes:
            n = int(rng.integers(150, 9000))  # words: ~1K-60K characters
            line = json.dumps({"text": " ".join(words[rng.integers(0, len(words), n)].tolist())}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return {"bytes": written, "documents": docs}


TOKENIZE = """
import json, os, sys, threading, time
from pathlib import Path
from longctx.data.sources import iter_records, source_identity
from longctx.data.tokenize import ByteTokenizer, HFTokenizer, tokenize_to_cache
def hwm(pid):  # peak RSS of a process since its exec (or fork), in bytes
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
workers = [0]
def watch():  # the tokenizer workers' peaks, polled while they live
    me = os.getpid()
    while True:
        try:
            kids = open(f"/proc/{me}/task/{me}/children").read().split()
        except OSError:
            kids = []
        for k in kids:
            try:
                workers[0] = max(workers[0], hwm(k))
            except (OSError, StopIteration):
                pass
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
path, cache, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = ByteTokenizer() if sys.argv[4] == "bytes" else HFTokenizer(sys.argv[4])
t0 = time.time()
store = tokenize_to_cache(tok, lambda: iter_records(path), source_identity(path, "text", "train", None), Path(cache),
                          num_proc=num_proc, progress=False)
print(json.dumps({"seconds": round(time.time() - t0, 1), "tokens": int(store.offsets[-1]),
                  "documents": store.num_documents, "token_dtype": store.tokens.dtype.name,
                  "peak_rss_main_bytes": hwm(os.getpid()), "peak_rss_worker_bytes": workers[0]}))
"""

TRAIN = """
import json, os, sys
from longctx.recipes import schema
from longctx.train.build import build
from longctx.train.trainer import train
path, run_dir, batching = sys.argv[1], sys.argv[2], sys.argv[4]
data = ["data.min_len=64", "data.max_len=1024", "data.tokens_per_step=2048"] if batching == "decompose" else [
    "data.batching=" + batching, "data.seq_len=1024", "train.batch_size=2"]
vocab = 259 if sys.argv[3] == "bytes" else 49152
recipe = schema.load(None, data + [
    "model.path=null", "model.tokenizer=" + sys.argv[3], "model.config={family: llama, vocab_size: " + str(vocab) + ", "
    "hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
    "max_position_embeddings: 2048}", "data.source=" + path, "train.max_steps=5", "train.warmup_steps=1", "log.wandb=false",
    "run.dir=" + run_dir, "run.threads=1"])
history = train(build(recipe))["history"]
print(json.dumps({"steps": len(history), "last_loss": round(history[-1]["loss"], 4),
                  "peak_rss_bytes": next(int(l.split()[1]) * 1024 for l in open(f"/proc/{os.getpid()}/status")
                                         if l.startswith("VmHWM"))}))
"""


BATCHINGS = ("decompose", "pack", "packed_docs")


def _child(code: str, *args: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd="/")
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "bytes"],
                   help="SmolLM2's BPE (the real path; ~0.2 GB of text a minute on 2 busy cores) or the byte "
                        "tokenizer (ids = bytes: the same reader, workers, writer and store, minutes for 2 GB)")
    p.add_argument("--workdir", default=None, help="where the corpora and caches go (default: a temp folder)")
    args = p.parse_args(argv)
    from longctx.train.build import default_model_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="longctx-bigcorpus-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT.parent), LONGCTX_CACHE=str(work / "cache"))
    os.environ["LONGCTX_CACHE"] = env["LONGCTX_CACHE"]
    # converted here, once: no child's peak includes the conversion
    model_dir = "bytes" if args.tokenizer == "bytes" else str(default_model_dir())
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    results = []
    for mb in args.sizes_mb:
        corpus = work / f"corpus-{mb}mb.jsonl"
        t0 = time.time()
        info = write_corpus(corpus, mb << 20)
        info["write_seconds"] = round(time.time() - t0, 1)
        tok = _child(TOKENIZE, str(corpus), str(work / "cache"), str(args.num_proc), model_dir, env=env)
        row = {"phase": "tokenize", "corpus_mb": mb, **info, **tok, "tokenizer": args.tokenizer,
               "num_proc": args.num_proc, **machine}
        print(json.dumps(row), flush=True)
        results.append(row)
        for batching in BATCHINGS:
            tr = _child(TRAIN, str(corpus), str(work / f"run-{mb}-{batching}"), model_dir, batching, env=env)
            row = {"phase": f"train_{batching}", "corpus_mb": mb, **tr, **machine}
            print(json.dumps(row), flush=True)
            results.append(row)
        corpus.unlink()
    small, large = min(args.sizes_mb), max(args.sizes_mb)

    def peak(phase, mb, key):
        return next(r[key] for r in results if r["phase"] == phase and r["corpus_mb"] == mb)

    print(json.dumps({"summary": True, "corpus_mb": [small, large], "measured_on": "cpu", "tokenizer": args.tokenizer,
                      "tokenize_peak_rss_ratio": round(peak("tokenize", large, "peak_rss_main_bytes")
                                                       / peak("tokenize", small, "peak_rss_main_bytes"), 3),
                      "tokenize_worker_peak_rss_ratio": round(peak("tokenize", large, "peak_rss_worker_bytes")
                                                              / peak("tokenize", small, "peak_rss_worker_bytes"), 3),
                      **{f"train_{b}_peak_rss_ratio": round(peak(f"train_{b}", large, "peak_rss_bytes")
                                                            / peak(f"train_{b}", small, "peak_rss_bytes"), 3)
                         for b in BATCHINGS},
                      "note": "peak RSS is VmHWM from /proc (ru_maxrss carries the parent's peak across exec); "
                              "workers' polled every 0.2 s; mapped token pages that training reads count in RSS"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
