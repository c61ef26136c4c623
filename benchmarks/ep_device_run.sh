#!/usr/bin/env bash
# One device call for expert parallelism on a 2-GPU machine: the environment (and whether the
# grouped GEMM honours torch's SM carveout), the NCCL GPU tests (tests/parallel, -m gpu), then
# benchmarks/bench_ep.py with the EP=1 baseline in the same run, then up to two more benchmark
# passes while the call's time allows. Everything goes under $OUT, at most 8 files (the device
# returns no more): env.txt, gpu_tests.txt, bench.log (every pass), the result JSON of each pass
# (ep_*.json, ep_*_pass2.json, ep_*_pass3.json), profiles.tgz.
#
#   OUT=/tmp/out VARIANTS=fixed,overlap_fixed [PASS2_ARGS="--shapes ... --variants ..."] \
#     [PASS3_ARGS="... --profile"] bash benchmarks/ep_device_run.sh [more bench_ep.py args for pass 1]
# (in PASS2_ARGS / PASS3_ARGS, @BEST@ and @TOP2@ stand for pass 1's best variant(s))
set -u
export PYTHONPATH="$PWD/src" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/ep_out}
TESTS_S=${TESTS_S:-150}   # seconds for the GPU tests
BENCH_S=${BENCH_S:-330}   # seconds for the first benchmark pass (rows are printed as they finish)
mkdir -p "$OUT"
call_start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  echo "cpus $(nproc)"
  git log --oneline -1
  git status --short
  # does torch._grouped_mm (bf16, persistent CUTLASS kernel) honour the SM carveout? A GEMM
  # that leaves half the SMs free must take clearly longer if it does.
  python3 - <<'EOF'
import torch
a = torch.randn(32 * 2048, 2048, device="cuda", dtype=torch.bfloat16)
b = torch.randn(32, 2048, 2048, device="cuda", dtype=torch.bfloat16).transpose(-2, -1)
offs = torch.arange(1, 33, device="cuda", dtype=torch.int32) * 2048
sms = torch.cuda.get_device_properties(0).multi_processor_count
for carve in (None, 16, sms // 2):
    torch._C._set_sm_carveout_experimental(carve)
    for _ in range(3):
        torch._grouped_mm(a, b, offs=offs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch._grouped_mm(a, b, offs=offs)
    end.record()
    end.synchronize()
    print(f"grouped_mm 32x[2048x2048x2048] bf16, SM carveout {carve} of {sms}: {start.elapsed_time(end) / 10:.3f} ms")
torch._C._set_sm_carveout_experimental(None)
EOF
} > "$OUT/env.txt" 2>&1

start=$(date +%s)
timeout "$TESTS_S" python3 -m pytest -q -rA -m gpu tests/parallel > "$OUT/gpu_tests.txt" 2>&1
rc=$?
echo "rc=$rc seconds=$(( $(date +%s) - start ))" >> "$OUT/gpu_tests.txt"
variants=${VARIANTS:-plain,fixed,overlap,overlap_fixed}
# a failed (or unfinished) check: time only what passed
if ! grep -q "PASSED.*test_nccl_overlap_with_sm_carveout_and_remote_first" "$OUT/gpu_tests.txt"; then
  variants=$(echo "$variants" | tr ',' '\n' | grep -v -E ":c[0-9]|:rf" | paste -sd, -)
fi
if ! grep -q "PASSED.*test_nccl_copy_engine_transport" "$OUT/gpu_tests.txt"; then
  variants=$(echo "$variants" | tr ',' '\n' | grep -v -E ":ce" | paste -sd, -)
fi
if ! grep -q "PASSED.*test_nccl_two_gpus_equal_single_gpu_layer" "$OUT/gpu_tests.txt"; then
  variants=$(echo "$variants" | tr ',' '\n' | grep -v overlap | paste -sd, -)
fi
variants=${variants:-plain}

res=/tmp/ep_bench_results
# one benchmark pass: its label, its time limit, bench_ep.py arguments
bench_pass() {
  local label=$1 limit=$2
  shift 2
  rm -rf "$res"
  local t0
  t0=$(date +%s)
  echo "=== pass $label: $*" >> "$OUT/bench.log"
  timeout "$limit" python3 benchmarks/bench_ep.py --world 2 --eps 1,2 --out "$res" "$@" >> "$OUT/bench.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - t0 )) pass=$label" >> "$OUT/bench.log"
  for f in "$res"/ep_*.json; do
    [ -e "$f" ] && cp "$f" "$OUT/$(basename "$f" .json)${label:+_$label}.json"
  done
  if ls "$res"/ep_profile_*.txt > /dev/null 2>&1; then
    (cd "$res" && tar czf "$OUT/profiles.tgz" ep_profile_*.txt)
  fi
}
bench_pass "" "$BENCH_S" --variants "$variants" "$@"
# @BEST@ / @TOP2@ in PASS2_ARGS / PASS3_ARGS: the variant(s) of pass 1 with the highest mean
# fwd+bwd weak scaling over the shapes (another sample of them, or their profile)
ranked=$(python3 - "$OUT" <<'EOF'
import glob, json, statistics, sys
files = [f for f in glob.glob(sys.argv[1] + "/ep_*.json") if "_pass" not in f]
score = {}
for s in (json.load(open(files[0]))["summary"] if files else []):
    for label, v in s.get("variants", {}).items():
        score.setdefault(label, []).append(v["weak_scaling_efficiency_balanced"])
print(",".join(sorted(score, key=lambda k: -statistics.mean(score[k]))) or "overlap_fixed")
EOF
)
best=${ranked%%,*}
top2=$(echo "$ranked" | cut -d, -f1-2)
echo "variants ranked by pass 1: $ranked" >> "$OUT/bench.log"
PASS2_ARGS=${PASS2_ARGS:-}
PASS3_ARGS=${PASS3_ARGS:-}
PASS2_ARGS=${PASS2_ARGS//@BEST@/$best}
PASS2_ARGS=${PASS2_ARGS//@TOP2@/$top2}
PASS3_ARGS=${PASS3_ARGS//@BEST@/$best}
PASS3_ARGS=${PASS3_ARGS//@TOP2@/$top2}
# more passes (another sample of the same code for the spread, profiles) while time allows
if [ -n "${PASS2_ARGS:-}" ] && [ $(( $(date +%s) - call_start )) -lt "${PASS2_BEFORE_S:-330}" ]; then
  # shellcheck disable=SC2086
  bench_pass pass2 "${PASS2_S:-150}" $PASS2_ARGS
fi
if [ -n "${PASS3_ARGS:-}" ] && [ $(( $(date +%s) - call_start )) -lt "${PASS3_BEFORE_S:-400}" ]; then
  # shellcheck disable=SC2086
  bench_pass pass3 "${PASS3_S:-60}" $PASS3_ARGS
fi
tail -n 5 "$OUT/gpu_tests.txt"
grep -E "SM carveout" "$OUT/env.txt"
grep -E "EP=|rc=|===|ranked" "$OUT/bench.log" | tail -n 80
