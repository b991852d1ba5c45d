#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one call on a lent GPU (issue 15), within 9 minutes
# including installs, with the machine's own torch and triton (it has no network).
#
#   bash bench/gpu_wheels.sh                 # here, once: pure-Python wheels into .gpu-wheels/
#   bash bench/gpu_suite.sh                  # on the GPU machine, from the repo root, .gpu-wheels/ carried
#   bash bench/gpu_suite.sh --dry-run        # any CPU machine: tiny shapes, no installs (CI runs it)
#   bash bench/gpu_suite.sh --install-only   # only the install step
#
# Steps (each under `timeout`; a failing step is recorded and the rest still run; the exit
# status is non-zero when any step failed; a missed target is a result, not a failure):
#   install    pip install --no-deps --no-index the wheels in .gpu-wheels (omegaconf, liger-kernel,
#              cut-cross-entropy, peft with accelerate and psutil; setuptools when the machine's is older than 77), then longctx
#              itself with --no-deps -e . (without pip: the wheels unzipped onto PYTHONPATH and
#              the repo linked as `longctx`); GPU runs only
#   pytest     python3 -m pytest -q -m gpu tests/gpu   (dry run: --collect-only)
#   cce        bench/cce.py: naive vs our CCE vs Liger vs Apple's CCE, N=65536, V=128256, D=4096, bf16
#   attention  bench/gpu_attention.py: block kernels' causal fwd+bwd TFLOP/s at 32K vs an 8192^3 matmul
#   memo_swap  bench/gpu_memo_swap.py: pinned copy bandwidth and the share of MEMO's swap compute hides
#   step       bench/gpu_step.py: one optimizer step of a Llama-3.1-8B-shaped model at growing lengths,
#              measured peak vs `longctx plan`
# Output goes to $OUT when set (the files that come back from the GPU machine), else to
# bench/results/tmp/: <prefix>-<step>.jsonl per benchmark, <prefix>-pytest.log, <prefix>-suite.log
# (installs and every step's stderr), <prefix>-failures.log (each failing test's traceback, written as
# it fails) and <prefix>-suite.json (machine, steps, every target);
# prefix gpu, or dryrun. The last line printed is {"summary": ...} of the whole suite.
# The steps share GPU_SUITE_BUDGET_S seconds (default 510; the summary then takes a few): each gets its allotment plus what
# earlier steps left unused, and each benchmark gets its share as --time-budget, so it stops
# growing sizes itself before `timeout` ends it.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --install-only) MODE=install ;;
  *) echo "usage: bash bench/gpu_suite.sh [--dry-run | --install-only]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [[ $MODE == dry ]]; then
  PREFIX=dryrun
  BUDGET=${GPU_SUITE_BUDGET_S:-170}
  declare -A ALLOT=([install]=0 [pytest]=40 [cce]=25 [attention]=25 [memo_swap]=25 [step]=55)
else
  PREFIX=gpu
  BUDGET=${GPU_SUITE_BUDGET_S:-510}
  export TRITON_INTERPRET=0
  # from the H200 run of 2026-11-30: pytest took ~185 s in all, cce 61, attention 11, memo_swap 47
  declare -A ALLOT=([install]=30 [pytest]=220 [cce]=75 [attention]=25 [memo_swap]=55 [step]=80)
fi
ORDER=(install pytest cce attention memo_swap step)
DEST=${OUT:-bench/results/tmp}
mkdir -p "$DEST"
LOG="$DEST/$PREFIX-suite.log"
: > "$LOG"
STEPS=()  # name:exit status:seconds:limit, for the summary

say() { echo "[gpu_suite $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# Seconds step $1 may take: the suite's remaining time less the allotments of the steps after it.
limit_for() {
  local later=0 seen=0 name
  for name in "${ORDER[@]}"; do
    (( seen )) && later=$(( later + ALLOT[$name] ))
    [[ $name == "$1" ]] && seen=1
  done
  echo $(( START + BUDGET - $(date +%s) - later ))
}

# run_step NAME STDOUT-FILE COMMAND...: stdout to the file and the console, stderr to the log and
# the console; '@BUDGET@' in the command becomes the step's own time budget (its limit less 15 s).
run_step() {
  local name=$1 out=$2 limit rc t0 arg
  shift 2
  limit=$(limit_for "$name")
  if (( limit < 10 )); then
    say "$name: skipped, the suite's ${BUDGET}s are spent"
    STEPS+=("$name:skipped:0:$limit")
    return
  fi
  local cmd=()
  for arg in "$@"; do cmd+=("${arg//@BUDGET@/$(( limit - 15 ))}"); done
  say "$name: ${cmd[*]} (limit ${limit}s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "${cmd[@]}" 2> >(tee -a "$LOG" >&2) | tee "$out"
  rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $(( $(date +%s) - t0 ))s"
  STEPS+=("$name:$rc:$(( $(date +%s) - t0 )):$limit")
}

install() {
  local site="${TMPDIR:-/tmp}/longctx-gpu-site" link="${TMPDIR:-/tmp}/longctx-gpu-path" pip_ok=0
  "$PY" -m pip --version >/dev/null 2>&1 && pip_ok=1
  if [[ ! -d .gpu-wheels ]]; then
    echo "install: no .gpu-wheels folder (bash bench/gpu_wheels.sh makes it); using what is installed"
  elif ! { (( pip_ok )) && "$PY" -m pip install --no-deps --no-index --find-links .gpu-wheels \
             omegaconf liger-kernel cut-cross-entropy peft accelerate psutil; }; then
    # No pip, or an interpreter pip cannot write to: a pure-Python wheel is a zip of the files
    # site-packages would get (setuptools left out: only pip's editable install needs it).
    echo "install: pip could not install the wheels; unzipping them into $site"
    mkdir -p "$site" || return 1
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:] if "setuptools-" not in w]' \
      "$site" .gpu-wheels/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # pyproject's SPDX licence string needs setuptools >= 77; without build isolation (no network)
  # the interpreter's own setuptools builds the editable install
  if ! { (( pip_ok )) \
         && { "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
              || "$PY" -m pip install --no-deps --no-index --find-links .gpu-wheels 'setuptools>=77'; } \
         && "$PY" -m pip install --no-deps --no-index --no-build-isolation -e .; }; then
    echo "install: no editable install; linking the repo as $link/longctx instead"
    mkdir -p "$link" && ln -sfn "$PWD" "$link/longctx" || return 1
    export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # from /tmp, so the repo folder itself is not what `import longctx` finds
  (cd /tmp && "$PY" - <<'CHECK'
import importlib

import longctx, omegaconf, torch, triton  # noqa: E401  the suite cannot run without these

print("install: longctx", longctx.__file__, "torch", torch.__version__, "triton", triton.__version__)
for name in ("liger_kernel.transformers.functional", "cut_cross_entropy"):  # bench/cce.py rows only
    try:
        importlib.import_module(name)
    except Exception as e:
        print(f"install: import {name}: {type(e).__name__}: {e}")
CHECK
  )
}

if [[ $MODE != dry ]]; then
  limit=$(limit_for install)
  say "install (limit ${limit}s)"
  t0=$(date +%s)
  # not under `timeout`: it must export PYTHONPATH into this shell; pip from a local folder is quick
  install >>"$LOG" 2>&1
  rc=$?
  say "install: exit $rc after $(( $(date +%s) - t0 ))s"
  STEPS+=("install:$rc:$(( $(date +%s) - t0 )):$limit")
  if [[ $MODE == install ]]; then tail -3 "$LOG"; exit $rc; fi
fi

if [[ ! -d tests/gpu ]]; then
  say "pytest: tests/gpu does not exist"
  STEPS+=("pytest:missing:0:0")
elif [[ $MODE == dry ]]; then
  run_step pytest "$DEST/$PREFIX-pytest.log" "$PY" -m pytest -q --collect-only -m gpu tests/gpu
else
  # slowest tests listed at the end; with pytest-timeout (in the GPU image) one stuck test cannot eat the step
  TIMEOUT_ARGS=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=120)
  # each failure's traceback lands in <prefix>-failures.log as it happens (tests/conftest.py)
  : > "$DEST/$PREFIX-failures.log"
  LONGCTX_FAILURES_TO="$DEST/$PREFIX-failures.log" \
    run_step pytest "$DEST/$PREFIX-pytest.log" "$PY" -m pytest -q -rs --durations=15 ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} -m gpu tests/gpu
fi

if [[ $MODE == dry ]]; then
  run_step cce "$DEST/$PREFIX-cce.jsonl" "$PY" -m longctx.bench.cce --dry-run --time-budget @BUDGET@
  run_step attention "$DEST/$PREFIX-attention.jsonl" "$PY" -m longctx.bench.gpu_attention --dry-run --time-budget @BUDGET@
  run_step memo_swap "$DEST/$PREFIX-memo_swap.jsonl" "$PY" -m longctx.bench.gpu_memo_swap --dry-run --time-budget @BUDGET@
  run_step step "$DEST/$PREFIX-step.jsonl" "$PY" -m longctx.bench.gpu_step --dry-run --time-budget @BUDGET@
else
  run_step cce "$DEST/$PREFIX-cce.jsonl" "$PY" -m longctx.bench.cce --device cuda --n 65536 --vocab 128256 \
    --hidden 4096 --dtype bf16 --impls reference,cce,liger,apple --repeats 2 --time-budget @BUDGET@
  run_step attention "$DEST/$PREFIX-attention.jsonl" "$PY" -m longctx.bench.gpu_attention --time-budget @BUDGET@
  run_step memo_swap "$DEST/$PREFIX-memo_swap.jsonl" "$PY" -m longctx.bench.gpu_memo_swap --time-budget @BUDGET@
  run_step step "$DEST/$PREFIX-step.jsonl" "$PY" -m longctx.bench.gpu_step --time-budget @BUDGET@
fi

# The suite's summary: machine, each step's status, every benchmark's targets.
"$PY" - "$MODE" "$DEST" "$PREFIX" "$(( $(date +%s) - START ))" "${STEPS[@]}" <<'EOF'
import importlib.metadata
import json
import os
import platform
import sys

mode, dest, prefix, seconds, *steps = sys.argv[1:]
summary = {"mode": mode, "seconds": int(seconds), "steps": {}, "failed_steps": [], "targets": {}, "benches": {}}
for item in steps:
    name, rc, secs, limit = item.split(":")
    # a dry run only collects tests/gpu: none there (pytest's 5, or no folder) is not a failure
    ok = rc == "0" or (mode == "dry" and name == "pytest" and rc in ("5", "missing"))
    summary["steps"][name] = {"exit": rc, "seconds": int(secs), "limit_seconds": int(limit), "ok": ok}
    if not ok:
        summary["failed_steps"].append(name)
for bench in ("cce", "attention", "memo_swap", "step"):
    path = os.path.join(dest, f"{prefix}-{bench}.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    found = [json.loads(x)["summary"] for x in lines if x.startswith('{"summary"')]
    if not found:
        summary["benches"][bench] = "no summary line"
        continue
    summary["benches"][bench] = "ok"
    for key, target in found[-1].get("targets", {}).items():
        summary["targets"][key] = target
summary["targets_met"] = f'{sum(t["pass"] for t in summary["targets"].values())}/{len(summary["targets"])}'
env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
for dist in ("torch", "triton", "transformers", "omegaconf", "liger-kernel", "cut-cross-entropy", "flash-attn", "longctx"):
    try:
        env[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        env[dist] = None
try:
    import torch

    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)), cuda=torch.version.cuda,
                   gpu_memory_bytes=props.total_memory)
    from longctx.kernels.capability import flash_attn_status

    env["flash_attn_status"] = flash_attn_status()[1]
except Exception as e:  # the summary must still be written
    env["error"] = f"{type(e).__name__}: {e}"
summary["machine"] = env
with open(os.path.join(dest, f"{prefix}-suite.json"), "w") as f:
    json.dump({"summary": summary}, f, indent=1)
print(json.dumps({"summary": summary}))
sys.exit(1 if summary["failed_steps"] else 0)
EOF
