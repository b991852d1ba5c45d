#!/usr/bin/env bash
# Downloads the pure-Python wheels that bench/gpu_suite.sh installs on a lent GPU machine, which
# has no network: run it here (the registry is reachable), then carry the folder with the repo.
#
#   bash bench/gpu_wheels.sh [folder]        # default: .gpu-wheels at the repo root (gitignored)
#
# The GPU machine keeps its own torch and triton (and transformers, safetensors, numpy, pyyaml,
# scipy, pytest), so every wheel is fetched with --no-deps and installed with --no-deps:
#   omegaconf               the recipe loader; 2.4 vendors its ANTLR parser (2.3 needed
#                           antlr4-python3-runtime 4.9, an sdist only), so no antlr4 wheel
#   liger-kernel            Liger's fused linear cross-entropy (bench/cce.py --impls liger)
#   cut-cross-entropy       Apple's CCE (bench/cce.py --impls apple)
#   setuptools              for `pip install -e .` without build isolation (no network there)
#   peft, accelerate        LoRA (model.adapter; tests/gpu/test_gpu_lora.py): peft imports accelerate
#   psutil                  accelerate imports it; CPython's stable ABI (abi3), no torch in it
# Each must be a py3-none-any wheel for Python 3.12 (psutil: the abi3 one, ABI3_OK below); their Requires-Dist on torch/triton is printed
# so a version that wants a newer torch than the GPU machine's (2.11, triton 3.6) shows here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${PYTHON:-python3}
LIMIT_MIB=40
SPECS=("omegaconf>=2.4,<3" "liger-kernel>=0.5" "cut-cross-entropy>=24.11" "setuptools>=77" "peft>=0.18"
       "accelerate>=1.0")
ABI3_SPECS=("psutil>=5.9")  # no pure-Python wheel exists: CPython 3.12's stable-ABI one

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform any --implementation py --abi none -d "$DEST" "${SPECS[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --implementation cp --abi abi3 -d "$DEST" "${ABI3_SPECS[@]}"

# Only pure-Python wheels: the GPU machine must not get a compiled extension built for another torch.
"$PY" - "$DEST" <<'EOF'
import pathlib
import re
import sys
import zipfile

folder = pathlib.Path(sys.argv[1])
ABI3_OK = ("psutil-",)  # compiled against CPython's stable ABI only (no torch, no CUDA)
bad = []
for whl in sorted(folder.glob("*.whl")):
    if not whl.name.endswith("-none-any.whl") and not (whl.name.startswith(ABI3_OK) and "-abi3-" in whl.name):
        bad.append(whl.name)
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    version = re.search(r"^Version: (.+)$", text, re.M).group(1)
    needs = [line.split(": ", 1)[1] for line in text.splitlines()
             if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    print(f"{whl.name}: version {version}; requires {', '.join(needs) or 'nothing'}")
if bad:
    sys.exit(f"not pure-Python wheels: {', '.join(bad)}")
EOF

TOTAL=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total $(( TOTAL / 1024 )) KiB in $DEST ($(ls "$DEST"/*.whl | wc -l) wheels)"
if (( TOTAL > LIMIT_MIB * 1024 * 1024 )); then
  echo "over ${LIMIT_MIB} MiB: too large to carry to the GPU machine (64 MiB in all, with the repo)" >&2
  exit 1
fi
