#!/usr/bin/env bash
# One device call for offloaded decoding on a one-GPU machine: the environment, the offload GPU
# tests (pytest -m gpu tests/offload), then either the profile (benchmarks/profile_offload.py:
# interleaved repeats + torch.profiler timeline split) or the benchmark (bench_offload.py).
# Everything goes under $OUT, at most 8 files: env.txt, gpu_tests.txt, profile.log +
# profile.json + traces.tgz, or bench.log + the result JSON and PNG.
#
# Mode staging: the staged-prefetch comparison (bench_offload.py --variants staging --quick) on the
# Mixtral-8x7B config (16 slots, 2 staging) and on the Qwen3-30B-A3B config (16 and 32 slots, 8
# staging; batch 1 only): bench.log, qwen3.log and the two result JSONs and PNGs.
#
#   OUT=/tmp/out bash benchmarks/offload_device_run.sh profile [profile_offload.py args]
#   OUT=/tmp/out TAG=s4 bash benchmarks/offload_device_run.sh bench [bench_offload.py args]
#   OUT=/tmp/out TAG=s5 bash benchmarks/offload_device_run.sh staging
#
# Mode engines: this tree's offload engine against the fifth session's in one process
# (bench_offload.py --variants engines --quick; the goal runs at batch 1 and 8, interleaved, 2
# repeats). The baseline is an importable copy of the package renamed moekit_s5, made before the
# call and carried with it (build/ is ignored by git):
#   rm -rf build/s5 && mkdir -p build/s5 && git archive 19ae59a~1 src/moekit | tar -x -C build/s5 \
#     && mv build/s5/src/moekit build/s5/moekit_s5 && rmdir build/s5/src \
#     && grep -rl moekit build/s5/moekit_s5 --include=*.py | xargs sed -i -E \
#        's/\bmoekit\.([a-z_]+)/moekit_s5.\1/g; s/from moekit import/from moekit_s5 import/g'
#   OUT=/tmp/out TAG=s6 bash benchmarks/offload_device_run.sh engines     (run with carry build/s5)
# BASELINE=moekit_s6 compares with the sixth session's engine instead (build/s6 made the same way
# from 0e22bd1, the commit before the seventh session's CPU worker, the package renamed moekit_s6):
#   OUT=/tmp/out TAG=s7 BASELINE=moekit_s6 REPEATS=3 BENCH_TIMEOUT=300 bash benchmarks/offload_device_run.sh engines
#
# Mode graphs (~4 min): the GPU tests, then benchmarks/bench_offload_graphs.py (decode graphs on / off,
# interleaved repeats): gpu_tests.txt, bench.log and the result JSON and PNG.
#   OUT=/tmp/out TAG=s9 bash benchmarks/offload_device_run.sh graphs [bench_offload_graphs.py args]
#
# Mode probe (~1 min): the two CPU-expert GPU tests and benchmarks/probe_host_wait.py (how a stream
# could wait for a value the host writes later): gpu_tests.txt, probe.log, probe.json.
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
if [ "$MODE" = probe ]; then  # ~1 min: the CPU-expert GPU tests, then the ways a stream could wait for the host
  timeout 90 python3 -m pytest -q -m gpu tests/offload/test_offload_gpu.py -k cpu -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -3
  timeout 70 python3 benchmarks/probe_host_wait.py --timeout 12 --out "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log"
  exit 0
fi
timeout "${TESTS_S:-180}" python3 -m pytest -q -m gpu tests/offload tests/hf -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
if [ "$MODE" = profile ]; then
  timeout 400 python3 benchmarks/profile_offload.py --out "$OUT/profile.json" --trace-dir /tmp/traces "$@" \
    2>&1 | grep -v USDT | tee "$OUT/profile.log" | tail -40
  tar czf "$OUT/traces.tgz" -C /tmp traces 2>/dev/null
elif [ "$MODE" = staging ]; then
  day=$(date -u +%F)
  timeout 180 python3 benchmarks/bench_offload.py --variants staging --quick --staging 2 \
    --out "$OUT/offload_h100_${day}_${TAG:-s5}.json" 2>&1 | tee "$OUT/bench.log" | grep -E "^moekit|^all|^goal batch._same" | tail -50
  timeout 120 python3 benchmarks/bench_offload.py --preset qwen3-30b-a3b --variants staging --quick --slots 16,32 \
    --staging 8 --batches 1 --out "$OUT/offload_h100_${day}_${TAG:-s5}_qwen3.json" 2>&1 | tee "$OUT/qwen3.log" \
    | grep -E "^moekit|^all|^goal batch._same" | tail -60
elif [ "$MODE" = graphs ]; then
  day=$(date -u +%F)
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_offload_graphs.py \
    --out "$OUT/offload_graphs_h100_${day}_${TAG:-s9}.json" "$@" 2>&1 | grep -v USDT | tee "$OUT/bench.log" \
    | grep -E "^moekit|^all|^pinned|@ batch|rror|Traceback" | cut -c1-300 | tail -70
elif [ "$MODE" = engines ]; then
  day=$(date -u +%F)
  BASELINE=${BASELINE:-moekit_s5}
  export PYTHONPATH="$PWD/src:$PWD/build/${BASELINE#moekit_}"
  timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_offload.py --variants engines --quick \
    --repeats "${REPEATS:-2}" --baseline "$BASELINE" --out "$OUT/offload_h100_${day}_${TAG:-s6}.json" "$@" 2>&1 | grep -v USDT | tee "$OUT/bench.log" \
    | grep -E "^moekit|^all|^engines|^pinned|^model|rror" | cut -c1-330 | tail -70
else
  day=$(date -u +%F)
  timeout 420 python3 benchmarks/bench_offload.py --out "$OUT/offload_h100_${day}_${TAG:-s4}.json" "$@" \
    2>&1 | tee "$OUT/bench.log" | tail -60
fi
