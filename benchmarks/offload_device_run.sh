#!/usr/bin/env bash
# One device call for offloaded decoding on a one-GPU machine: the environment, the offload GPU
# tests (pytest -m gpu tests/offload), then either the profile (benchmarks/profile_offload.py:
# interleaved repeats + torch.profiler timeline split) or the benchmark (bench_offload.py).
# Everything goes under $OUT, at most 8 files: env.txt, gpu_tests.txt, profile.log +
# profile.json + traces.tgz, or bench.log + the result JSON and PNG.
#
#   OUT=/tmp/out bash benchmarks/offload_device_run.sh profile [profile_offload.py args]
#   OUT=/tmp/out TAG=s4 bash benchmarks/offload_device_run.sh bench [bench_offload.py args]
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/offload_out}
MODE=${1:-profile}
shift || true
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  echo "cpus $(nproc)"; free -g | head -2; date -u
  git log --oneline -1 2>/dev/null
} >"$OUT/env.txt" 2>&1
timeout 120 python3 -m pytest -q -m gpu tests/offload -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
if [ "$MODE" = profile ]; then
  timeout 400 python3 benchmarks/profile_offload.py --out "$OUT/profile.json" --trace-dir /tmp/traces "$@" \
    2>&1 | grep -v USDT | tee "$OUT/profile.log" | tail -40
  tar czf "$OUT/traces.tgz" -C /tmp traces 2>/dev/null
else
  day=$(date -u +%F)
  timeout 420 python3 benchmarks/bench_offload.py --out "$OUT/offload_h100_${day}_${TAG:-s4}.json" "$@" \
    2>&1 | tee "$OUT/bench.log" | tail -60
fi
