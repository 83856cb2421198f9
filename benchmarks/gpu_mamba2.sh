#!/usr/bin/env bash
# Issue 21 (Mamba-2 at full speed) on the GPU machine in one call of at most 10 minutes: stages in priority order,
# each bounded by the time left (TOTAL_SECONDS, default 570, minus a reserve to pack the results), its results kept
# as they come:
#   setup       benchmarks/gpu_run.sh's setup stage (mamba_ssm and causal_conv1d from .carry: cuda_site.tgz, wheels or
#               sdists built for sm_90); the wheels it builds stay in /tmp/wheels (KEEP_WHEELS=1: their pieces to $OUT)
#   tests       tests/test_gpu.py and tests/test_generation.py, not the interpreter tests (TEST_SECONDS, 120)
#   m2prefill   gpu_prefill.py --tag _mamba2: mamba2-2.7b then mamba2-1.3b, prompts 8192 4096 16384 32768 2048, batch 1
#               and 8: ours dense and default 0.6 (eager, graph), ours-triton (the project's SSD), ours-reference (the
#               PyTorch SSD, up to 8192 tokens), then mamba_ssm's and transformers' dense (PREFILL_SECONDS, 200; our
#               rows start no case after 60% of it so the twins' rows, which the targets need, get the rest)
#   m2generate  gpu_generate.py --tag _mamba2: mamba2-2.7b's target cases (8192 + 128, batch 1 and 8) first, then the
#               rest of 2048 / 32768 and mamba2-1.3b: mamba_ssm generate(cg=True), ours dense, default 0.6, the Triton
#               step, the project's kernels alone, transformers (GEN_SECONDS, 130)
#   m1rows      the Mamba-1 rows of RESULTS.md, rerun with their committed commands: gpu_generate_default (tag
#               _default) and gpu_prefill on mamba-1.4b (M1_SECONDS, 190: 40% and 60%)
#   chunks      gpu_prefill.py --mamba2-kernels: one mamba2-2.7b layer's SSD and mixer time at widths around 256-token
#               chunks (settles layers.SCAN_CHUNKS["mamba2"]) and each score's share of the layer (CHUNK_SECONDS, 60)
# $OUT receives run.log (this log) and results.tgz (every result file and test log, packed again after each stage).
# Where setup has to build (no .carry/cuda_site.tgz or wheels: about 5 minutes) the last stages will not fit: a second
# call on the warm machine runs them (STAGES="m1rows chunks"; setup is skipped where the packages import).
#   OUT=/some/folder bash benchmarks/gpu_mamba2.sh
#   STAGES="tests m2prefill" OUT=... bash benchmarks/gpu_mamba2.sh        # some stages only
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_mamba2.sh                  # on a CPU: every stage, tiny shapes, no setup
set -uo pipefail
OUT=${OUT:-out/gpu_mamba2}
RES=${RES:-/tmp/gpu_mamba2_results}
STAGES=${STAGES:-setup tests m2prefill m2generate m1rows chunks}
SMOKE=${SMOKE:-}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$SECONDS
DEADLINE=$((SECONDS + ${TOTAL_SECONDS:-570}))
RESERVE=15  # seconds kept for the last pack
stage() { echo "=== [$((SECONDS - t0)) s] $*"; }
on() { [[ " $STAGES " == *" $1 "* ]]; }
budget() { local left=$((DEADLINE - SECONDS - RESERVE)); echo $(($1 < left ? $1 : left)); }
pack() { tar czf "$OUT/results.tgz.part" -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
smoke() { [ -n "$SMOKE" ] && echo "--smoke"; }
# run NAME WANTED_SECONDS COMMAND...: within min(WANTED, time left) seconds; the command may read $SOFT (the budget
# less a margin: the scripts' --max-seconds, after which they start no new case)
run() {
  local name=$1 want=$2 b
  shift 2
  b=$(budget "$want")
  if [ "$b" -lt 30 ]; then stage "skip $name: ${b} s left"; return; fi
  export SOFT=$((b > 80 ? b - 40 : b / 2))
  stage "$name (at most $b s)"
  timeout "$b" bash -c "$*" || echo "$name FAILED or timed out"
  pack
}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site

if on setup && [ -z "$SMOKE" ]; then
  stage "setup"
  OUT=$RES/setup STAGES=setup timeout "$(budget 420)" bash benchmarks/gpu_run.sh > /dev/null 2>&1
  cat "$RES/setup/run.log" 2>/dev/null
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site
  if [ -n "${KEEP_WHEELS:-}" ] && ls "$RES"/setup/wheels/* >/dev/null 2>&1; then mv "$RES"/setup/wheels/* "$OUT"/; fi
  rm -rf "$RES/setup/wheels"
  pack
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'from simba_compress import backends as b; print(b.describe())' || echo "simba_compress does not import"

if on tests; then
  tests="tests/test_gpu.py tests/test_generation.py"
  [ -n "$SMOKE" ] && tests="tests/test_gpu.py"
  run tests "${TEST_SECONDS:-120}" "python3 -m pytest -q -rs --durations 10 -p no:cacheprovider $tests -k 'not interpreter' \
    > $RES/test_gpu.log 2>&1; tail -n 30 $RES/test_gpu.log"
fi
if on m2prefill; then
  run m2prefill "${PREFILL_SECONDS:-200}" 'python3 benchmarks/gpu_prefill.py --out '"$RES"' --tag _mamba2 \
    --models mamba2-2.7b mamba2-1.3b --seq-lens 8192 4096 16384 32768 2048 --batches 1 8 --reps 3 --warmup 1 \
    --twins mamba_ssm transformers --twin-max-tokens 16384 --kernels triton reference --no-profile \
    --max-seconds $((SOFT * 60 / 100)) '"$(smoke)"
fi
if on m2generate; then
  run m2generate "${GEN_SECONDS:-130}" 'python3 benchmarks/gpu_generate.py --out '"$RES"' --tag _mamba2 \
    --shapes mamba2-2.7b mamba2-1.3b --prompts 8192 2048 32768 --batches 1 8 --new-tokens 128 \
    --impls mamba_ssm dense simba dense_triton_step dense_triton transformers --reps 3 --max-seconds $SOFT '"$(smoke)"
fi
if on m1rows; then  # the committed commands of gpu_generate_default.md and gpu_prefill.md
  m1=${M1_SECONDS:-190}
  run m1generate $((m1 * 2 / 5)) 'python3 benchmarks/gpu_generate.py --out '"$RES"' --shapes mamba-1.4b --prompts 2048 8192 \
    --new-tokens 128 --impls mamba_ssm simba dense --reps 3 --tag _default --max-seconds $SOFT '"$(smoke)"
  run m1prefill $((m1 * 3 / 5)) 'python3 benchmarks/gpu_prefill.py --out '"$RES"' --max-seconds $((SOFT * 60 / 100)) \
    --models mamba-1.4b --reps 3 --warmup 1 --twins mamba_ssm --no-profile '"$(smoke)"
fi
if on chunks; then
  run chunks "${CHUNK_SECONDS:-60}" 'python3 benchmarks/gpu_prefill.py --out '"$RES"' --models --mamba2-kernels \
    --batches 1 8 --reps 3 '"$(smoke)"
fi
pack
stage "done"
ls -la "$OUT"
