#!/usr/bin/env bash
# One device call for expert parallelism on a 2-GPU machine: the environment, the NCCL GPU
# tests (tests/parallel, -m gpu), then benchmarks/bench_ep.py with the EP=1 baseline in the
# same run. Everything goes under $OUT, at most 8 files (the device returns no more):
# env.txt, gpu_tests.txt, bench.log, the result JSON, profiles.tgz (and bench2.log and its JSON
# when SECOND_ARGS asks for a second benchmark pass and the call's time allows it).
#
#   OUT=/tmp/out [SECOND_ARGS="--shapes ... --variants ..."] bash benchmarks/ep_device_run.sh [bench_ep.py args]
set -u
export PYTHONPATH="$PWD/src" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/ep_out}
TESTS_S=${TESTS_S:-150}   # seconds for the GPU tests
BENCH_S=${BENCH_S:-330}   # seconds for the benchmark (rows are printed as they finish)
# VARIANTS: bench_ep.py --variants (default all); the overlap ones are dropped if a GPU test fails
mkdir -p "$OUT"
call_start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  echo "cpus $(nproc)"
  git log --oneline -1
  git status --short
} > "$OUT/env.txt" 2>&1

start=$(date +%s)
timeout "$TESTS_S" python3 -m pytest -q -m gpu tests/parallel > "$OUT/gpu_tests.txt" 2>&1
rc=$?
echo "rc=$rc seconds=$(( $(date +%s) - start ))" >> "$OUT/gpu_tests.txt"
variants=${VARIANTS:-plain,fixed,overlap,overlap_fixed}
if [ "$rc" -ne 0 ]; then  # a failed check: time only the paths that were measured before
  variants=$(echo "$variants" | tr ',' '\n' | grep -v overlap | paste -sd, -)
  variants=${variants:-plain}
fi

res=/tmp/ep_bench_results
rm -rf "$res"
start=$(date +%s)
timeout "$BENCH_S" python3 benchmarks/bench_ep.py --world 2 --eps 1,2 --variants "$variants" --out "$res" "$@" \
  > "$OUT/bench.log" 2>&1
echo "rc=$? seconds=$(( $(date +%s) - start )) variants=$variants" >> "$OUT/bench.log"
cp "$res"/ep_*.json "$OUT/" 2>/dev/null
if ls "$res"/ep_profile_*.txt > /dev/null 2>&1; then
  (cd "$res" && tar czf "$OUT/profiles.tgz" ep_profile_*.txt)
fi
# an optional second pass (e.g. other NCCL settings) while the call's time allows
if [ -n "${SECOND_ARGS:-}" ] && [ $(( $(date +%s) - call_start )) -lt "${SECOND_BEFORE_S:-330}" ]; then
  rm -rf "$res"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${SECOND_S:-150}" python3 benchmarks/bench_ep.py --world 2 --eps 1,2 --out "$res" $SECOND_ARGS \
    > "$OUT/bench2.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start )) args=$SECOND_ARGS" >> "$OUT/bench2.log"
  for f in "$res"/ep_*.json; do [ -e "$f" ] && cp "$f" "$OUT/$(basename "$f" .json)_pass2.json"; done
  grep -E "EP=|rc=" "$OUT/bench2.log" | tail -n 30
fi
tail -n 5 "$OUT/gpu_tests.txt"
grep -E "EP=|rc=" "$OUT/bench.log" | tail -n 50
