#!/usr/bin/env bash
# The GPU check in one command: the 8B-shaped PM step (memory, MFU), an 8B-shaped RLOO step's stage times and the
# bf16-mixed checks, on random weights, offline, with lit_route taken from this working tree (no install).
#   bash benchmarks/gpu_check.sh             # a CUDA machine: benchmarks/results/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --dry-run   # tiny shapes on the CPU, into a temporary folder
# Options: python benchmarks/gpu_check.py --help. The Python used: $PYTHON, else the first of python, python3
# that imports torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  echo "gpu_check.sh: no python with torch found; set PYTHON=/path/to/python" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/gpu_check.py "$@"
