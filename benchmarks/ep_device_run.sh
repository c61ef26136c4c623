#!/usr/bin/env bash
# One device call for expert parallelism on a 2-GPU machine: the environment, the NCCL GPU
# tests (tests/parallel, -m gpu), then benchmark passes of benchmarks/bench_ep.py (each with
# its own EP=1 baseline, so every pass is a same-process comparison) while the call's time
# allows. Everything goes under $OUT in four files (the device returns at most eight):
# env.txt, gpu_tests.txt, bench.log (every pass's rows), results.tgz (each pass's result JSON,
# renamed ep_<gpu>_<date>_p<N>.json, and the --profile tables and timelines).
#
#   OUT=/tmp/out PASSES="args of pass 1;args of pass 2;..." [FALLBACK_PASSES="..."] [TESTS_S=150] \
#     [CALL_S=330] [PASS_S=150] [MIN_PASS_S=30] bash benchmarks/ep_device_run.sh
#
# FALLBACK_PASSES, if set, replaces PASSES when the GPU tests did not all pass (e.g. the same
# passes without the variant under test: a rank that fails mid-pass leaves the other waiting
# in a collective until the pass's time limit).
# Each pass runs `python3 benchmarks/bench_ep.py --world 2 --eps 1,2 <its args>`. A pass
# starts only if at least MIN_PASS_S of the CALL_S seconds (counted from the script's start)
# are left, and is stopped at PASS_S or at the end of CALL_S, whichever comes first, so the
# call ends inside its limit; put the passes in the order of their importance.
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/ep_out}
TESTS_S=${TESTS_S:-150}
CALL_S=${CALL_S:-330}
PASS_S=${PASS_S:-150}
MIN_PASS_S=${MIN_PASS_S:-30}
PASSES=${PASSES:-"--balanced-only --shapes olmoe_like --variants overlap_fixed:ce:rf"}
mkdir -p "$OUT"
call_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - call_start )); }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  echo "cpus $(nproc): $(grep -m1 'model name' /proc/cpuinfo)"
  git log --oneline -1
  git status --short
} > "$OUT/env.txt" 2>&1

if [ "$TESTS_S" -gt 0 ]; then
  t0=$(date +%s)
  timeout "$TESTS_S" python3 -m pytest -q -rA -m gpu tests/parallel > "$OUT/gpu_tests.txt" 2>&1
  rc=$?
  echo "rc=$rc seconds=$(( $(date +%s) - t0 ))" >> "$OUT/gpu_tests.txt"
  if [ "$rc" -ne 0 ] && [ -n "${FALLBACK_PASSES:-}" ]; then
    PASSES=$FALLBACK_PASSES
    echo "GPU tests failed (rc=$rc): running FALLBACK_PASSES" >> "$OUT/bench.log"
  fi
fi

res=/tmp/ep_bench_results
keep=/tmp/ep_bench_keep
rm -rf "$keep"
mkdir -p "$keep"
n=0
IFS=';' read -r -a pass_args <<< "$PASSES"
for args in "${pass_args[@]}"; do
  n=$(( n + 1 ))
  left=$(( CALL_S - $(elapsed) ))
  if [ "$left" -lt "$MIN_PASS_S" ]; then
    echo "=== pass $n skipped: ${left} s left of CALL_S=$CALL_S: $args" >> "$OUT/bench.log"
    continue
  fi
  limit=$(( left < PASS_S ? left : PASS_S ))
  rm -rf "$res"
  t0=$(date +%s)
  echo "=== pass $n (limit ${limit} s, at $(elapsed) s): $args" >> "$OUT/bench.log"
  # shellcheck disable=SC2086
  timeout "$limit" python3 benchmarks/bench_ep.py --world 2 --eps 1,2 --out "$res" $args >> "$OUT/bench.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - t0 )) pass=$n" >> "$OUT/bench.log"
  for f in "$res"/ep_*.json; do
    [ -e "$f" ] && cp "$f" "$keep/$(basename "$f" .json)_p$n.json"
  done
  for f in "$res"/ep_profile_*.txt; do
    [ -e "$f" ] && cp "$f" "$keep/"
  done
done
(cd "$keep" && tar czf "$OUT/results.tgz" .)
tail -n 4 "$OUT/gpu_tests.txt" 2>/dev/null
grep -E "EP=|rc=|===|weak_scaling" "$OUT/bench.log" | cut -c1-260 | tail -n 60
