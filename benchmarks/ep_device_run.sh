#!/usr/bin/env bash
# One device call for expert parallelism on a multi-GPU machine: the environment, the NCCL GPU
# tests (tests/parallel, -m gpu), then benchmark passes of benchmarks/bench_ep.py (each with
# its own EP=1 baseline, so every pass is a same-process comparison) while the call's time
# allows, then (optional) runs of benchmarks/bench_ep_rebalance.py (rebalancing in the loop)
# on the same GPUs. Everything goes under $OUT in at most five files (the device returns at most
# eight): env.txt, gpu_tests.txt, bench.log (every pass's rows), rebalance.log (if run),
# results.tgz (each pass's result JSON, renamed ep_<gpu>_<date>_p<N>.json, the --profile tables
# and timelines, and each rebalance run's ep_rebalance_<gpu>_<date>_w<WORLD>_r<N>.json/.png).
#
#   OUT=/tmp/out [WORLD=2] [EPS=1,2] PASSES="args of pass 1;args of pass 2;..." [FALLBACK_PASSES="..."] \
#     [TESTS="-m gpu tests/parallel"] [TESTS_S=150] [CALL_S=330] [PASS_S=150] [MIN_PASS_S=30] \
#     [REBALANCE_ARGS="args of run 1;args of run 2"] [REBALANCE_S=120] bash benchmarks/ep_device_run.sh
#
# FALLBACK_PASSES, if set, replaces PASSES when a GPU test failed (e.g. the same
# passes without the variant under test: a rank that fails mid-pass leaves the others waiting
# in a collective until the pass's time limit).
# Each pass runs `python3 benchmarks/bench_ep.py --world $WORLD --eps $EPS <its args>`. A pass
# starts only if at least MIN_PASS_S of the CALL_S seconds (counted from the script's start)
# are left after the REBALANCE_S kept for the rebalance runs (when REBALANCE_ARGS is set), and
# is stopped at PASS_S or when only that reserve is left, whichever comes first; put the passes
# in the order of their importance. Each rebalance run is `python3 benchmarks/bench_ep_rebalance.py
# --device cuda --world $WORLD <its args>`, all of them together under REBALANCE_S (and the end
# of CALL_S), so the call ends inside its limit.
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/ep_out}
TESTS_S=${TESTS_S:-150}
CALL_S=${CALL_S:-330}
PASS_S=${PASS_S:-150}
MIN_PASS_S=${MIN_PASS_S:-30}
PASSES=${PASSES:-"--balanced-only --shapes olmoe_like --variants overlap_fixed:ce:rf"}
WORLD=${WORLD:-2}
EPS=${EPS:-1,2}
TESTS=${TESTS:-"-m gpu tests/parallel"}
REBALANCE_ARGS=${REBALANCE_ARGS:-}
REBALANCE_S=${REBALANCE_S:-120}
reserve=0
[ -n "$REBALANCE_ARGS" ] && reserve=$REBALANCE_S
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
  # shellcheck disable=SC2086
  timeout "$TESTS_S" python3 -m pytest -q -rA $TESTS > "$OUT/gpu_tests.txt" 2>&1
  rc=$?
  echo "rc=$rc seconds=$(( $(date +%s) - t0 ))" >> "$OUT/gpu_tests.txt"
  # a test that failed (or pytest itself): the fallback; the time limit reached with no test
  # failed so far (rc 124): the passes as planned (the tests' own time limits turn a hung
  # collective into a failure, so keep them under TESTS_S)
  if [ "$rc" -ne 0 ] && [ -n "${FALLBACK_PASSES:-}" ] && \
     { [ "$rc" -ne 124 ] || grep -qE "^(FAILED|ERROR)|[0-9]+ (failed|error)|^[.sxXFE]*[FE][.sxXFE]* *(\[|$)" "$OUT/gpu_tests.txt"; }; then
    PASSES=$FALLBACK_PASSES
    echo "GPU tests failed (rc=$rc): running FALLBACK_PASSES" >> "$OUT/bench.log"
  elif [ "$rc" -eq 124 ]; then
    echo "GPU tests stopped at TESTS_S=$TESTS_S with no failure seen: running PASSES" >> "$OUT/bench.log"
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
  left=$(( CALL_S - reserve - $(elapsed) ))
  if [ "$left" -lt "$MIN_PASS_S" ]; then
    echo "=== pass $n skipped: ${left} s left of CALL_S=$CALL_S less ${reserve} s for rebalancing: $args" \
      >> "$OUT/bench.log"
    continue
  fi
  limit=$(( left < PASS_S ? left : PASS_S ))
  rm -rf "$res"
  t0=$(date +%s)
  echo "=== pass $n (limit ${limit} s, at $(elapsed) s): $args" >> "$OUT/bench.log"
  # shellcheck disable=SC2086
  timeout "$limit" python3 benchmarks/bench_ep.py --world "$WORLD" --eps "$EPS" --out "$res" $args \
    >> "$OUT/bench.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - t0 )) pass=$n" >> "$OUT/bench.log"
  for f in "$res"/ep_*.json; do
    [ -e "$f" ] && cp "$f" "$keep/$(basename "$f" .json)_p$n.json"
  done
  for f in "$res"/ep_profile_*.txt; do
    [ -e "$f" ] && cp "$f" "$keep/"
  done
done

if [ -n "$REBALANCE_ARGS" ]; then
  rb_end=$(( $(elapsed) + REBALANCE_S ))
  [ "$rb_end" -gt "$CALL_S" ] && rb_end=$CALL_S
  rb=/tmp/ep_rebalance_results
  rm -rf "$rb"
  n=0
  IFS=';' read -r -a rb_args <<< "$REBALANCE_ARGS"
  for args in "${rb_args[@]}"; do
    n=$(( n + 1 ))
    limit=$(( rb_end - $(elapsed) ))
    if [ "$limit" -lt 10 ]; then
      echo "=== rebalance run $n skipped: ${limit} s left: $args" >> "$OUT/rebalance.log"
      continue
    fi
    t0=$(date +%s)
    echo "=== rebalance run $n (limit ${limit} s, at $(elapsed) s): $args" >> "$OUT/rebalance.log"
    # shellcheck disable=SC2086
    timeout "$limit" python3 benchmarks/bench_ep_rebalance.py --device cuda --world "$WORLD" --out "$rb" \
      --suffix "w${WORLD}_r$n" $args >> "$OUT/rebalance.log" 2>&1
    echo "rc=$? seconds=$(( $(date +%s) - t0 )) run=$n" >> "$OUT/rebalance.log"
  done
  for f in "$rb"/ep_rebalance_*; do
    [ -e "$f" ] && cp "$f" "$keep/"
  done
fi
(cd "$keep" && tar czf "$OUT/results.tgz" .)
tail -n 4 "$OUT/gpu_tests.txt" 2>/dev/null
grep -E "EP=|rc=|===|weak_scaling" "$OUT/bench.log" | cut -c1-260 | tail -n 60
[ -f "$OUT/rebalance.log" ] && grep -vE "^\s*$|steps \(3 arms" "$OUT/rebalance.log" | cut -c1-200 | tail -n 30
echo "script seconds=$(elapsed)"
