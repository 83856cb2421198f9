#!/usr/bin/env bash
# Issue 22 (hybrids) on the GPU machine: every GPU part in one command, stages in priority order, each bounded by the
# time left of one call (TOTAL_SECONDS, default 570), its results packed into $OUT/results.tgz as they come:
#   setup     benchmarks/gpu_run.sh's setup stage (mamba_ssm and causal_conv1d from .carry), skipped under SMOKE
#   tests     the hybrid CUDA tests (tests/test_gpu.py -k hybrid: SDPA prefill on the kept tokens, the CUDA-graph decode
#             over per-layer KV caches with SDPA and with two matmuls, bf16, mamba_ssm's dense prefill; not
#             tests/test_hybrid.py, CPU tests whose transformers comparisons fail under the image's 5.17: see
#             gpu_session.sh) (TEST_SECONDS, 120)
#   check     benchmarks/check_mamba_ssm_hybrid.py with mamba_ssm itself, on the hybrid proxy (.carry/models) and on
#             hybrids mamba_ssm builds (CHECK_SECONDS, 60)
#   bench     benchmarks/gpu_hybrid.py: the mamba2attn-2.7b and Granite-4.0-H-like shapes, prompts 8192-65536,
#             batch 1 and 8, 128 new tokens, the targets first (BENCH_SECONDS, 330)
#   quality   benchmarks/hybrid_quality.py on the GPU: the choice on training text, the CLI's calibrated default output
#             (40 trials), the headline and all-position loss at 1024 and 4096 on 256 windows (QUALITY_SECONDS, 300)
#   train     a second call: benchmarks/gpu_proxies.sh KINDS=hybrid (the hybrid proxy with the full recipe), then
#   passkey   benchmarks/passkey_proxy.py --base the hybrid proxy (the Mamba-1 passkey recipe) and hybrid_quality.py
#             --stages passkey on it (PASSKEY_SECONDS, 400); neither has run on this hybrid yet
#   OUT=/some/folder bash benchmarks/gpu_hybrid.sh                                  # setup tests check bench
#   STAGES="quality" OUT=... bash benchmarks/gpu_hybrid.sh                          # a second call on the warm machine
#   STAGES="passkey" OUT=... bash benchmarks/gpu_hybrid.sh                          # after train (gpu_proxies.sh)
#   SMOKE=1 STAGES="tests bench" OUT=/tmp/smoke bash benchmarks/gpu_hybrid.sh       # on a CPU: tiny shapes, no setup
# Needs, inside the repository (gitignored, carried): .carry/corpus/{train.txt.xz,valid.txt.xz,tokenizer/},
# .carry/models/hybrid-proxy-d320-l16, and what gpu_run.sh's setup reads.
set -uo pipefail
OUT=${OUT:-out/gpu_hybrid}
RES=${RES:-/tmp/gpu_hybrid_results}
STAGES=${STAGES:-setup tests check bench}
SMOKE=${SMOKE:-}
PROXY=${PROXY:-.carry/models/hybrid-proxy-d320-l16}
CORPUS=${CORPUS:-.carry/corpus}
source benchmarks/gpu_stages.sh  # stage, run, budget, pack; the setup stage

if on tests; then
  run tests "${TEST_SECONDS:-120}" "python3 -m pytest -q -rs --durations 10 -p no:cacheprovider tests/test_gpu.py \
    -k 'hybrid' > $RES/test_gpu_hybrid.log 2>&1; tail -n 30 $RES/test_gpu_hybrid.log"
fi
if on check && [ -z "$SMOKE" ]; then
  run check "${CHECK_SECONDS:-60}" "python3 benchmarks/check_mamba_ssm_hybrid.py --folder $PROXY \
    --out $RES/check_mamba_ssm_hybrid"
fi
if on bench; then
  run bench "${BENCH_SECONDS:-330}" 'python3 benchmarks/gpu_hybrid.py --out '"$RES"' --max-seconds $SOFT '"${SMOKE:+--smoke}"
fi
if on quality; then
  run quality "${QUALITY_SECONDS:-300}" "python3 benchmarks/hybrid_quality.py --corpus $CORPUS --model $PROXY \
    --out $RES/quality --stages choose headline --trials 40 --windows 256 --choose-windows 64"
fi
if on passkey; then
  run passkey "${PASSKEY_SECONDS:-400}" "python3 benchmarks/passkey_proxy.py --base $PROXY --train $CORPUS/train.txt.xz \
    --valid $CORPUS/valid.txt.xz --out $RES/hybrid-proxy-d320-l16-passkey && python3 benchmarks/hybrid_quality.py \
    --corpus $CORPUS --model $PROXY --passkey-model $RES/hybrid-proxy-d320-l16-passkey --out $RES/quality \
    --stages passkey"
fi
pack
stage "done"
ls -la "$OUT"
