#!/usr/bin/env bash
# Install moekit (editable) with optional extras, choosing the right torch build first.
#   bash scripts/install.sh            # core + plotting (what `moekit train` needs)
#   bash scripts/install.sh dev        # everything the test suite needs
# On a machine without an NVIDIA GPU, torch is installed as the CPU build before moekit,
# so that pip never resolves `torch>=2.6` to a multi-GB CUDA wheel. An existing torch>=2.6 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-train}

have_torch() { $PY -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; }

if ! have_torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install -q "torch>=2.6"
  else
    # 2.13.0 is the CPU build kept on this project's CPU machines; elsewhere use PyTorch's CPU wheels.
    $PY -m pip install -q torch==2.13.0 \
      || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PY -m pip install -q -e ".[${extras}]"
