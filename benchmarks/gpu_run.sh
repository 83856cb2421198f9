#!/usr/bin/env bash
# Issue 6 on a GPU machine: mamba_ssm and causal_conv1d, the GPU tests, the prefill benchmark.
#   OUT=/some/folder STAGES="build tests bench" bash benchmarks/gpu_run.sh
# build: install the wheels in .carry/wheels if there are any, else build both from .carry/sdist/*.tar.gz in
#   parallel (about 6 minutes with 16 cores) and copy the wheels to $OUT/wheels.tgz when they are small enough to
#   come back; a warm machine that already has them skips this. tests: tests/test_gpu.py. bench:
#   benchmarks/gpu_prefill.py with both scans and the scan-kernel table, within BENCH_SECONDS.
# Needs the wheels of packages the image lacks in .whl/ (pydantic: simba_compress imports it), optionally
# .carry/models/mamba-proxy-d320-l16 (the proxy test skips without it). Every stage is guarded and writes under
# $OUT as it goes: run.log (everything), build.log, test_gpu.log, gpu_prefill.{json,md}, gpu_scan.json.
set -uo pipefail
OUT=${OUT:-out/gpu}
STAGES=${STAGES:-build tests bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$SECONDS
stage() { echo "=== [$((SECONDS - t0)) s] $*"; }
has() { python3 -c "import $1" >/dev/null 2>&1; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site  # installed by an earlier call on this machine
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || echo "wheel install FAILED"
fi
python3 -c 'import simba_compress; print("simba_compress imports")' || echo "simba_compress does not import: see above"

if [[ " $STAGES " == *" build "* ]]; then
  stage "build"
  if ls .carry/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl || echo "prebuilt wheels FAILED to install"
  fi
  pids=()
  for pkg in mamba_ssm causal_conv1d; do
    sdist=$(ls .carry/sdist/$pkg-*.tar.gz 2>/dev/null | head -1)
    mod=$([ $pkg = mamba_ssm ] && echo selective_scan_cuda || echo causal_conv1d_cuda)
    if has "$mod"; then echo "$pkg already installed"; continue; fi
    if [ -z "$sdist" ]; then echo "no $pkg sdist under .carry/sdist"; continue; fi
    WHEEL_DIR=/tmp/wheels MAX_JOBS=8 timeout 560 bash benchmarks/build_mamba_ssm.sh "$sdist" > "$OUT/build_$pkg.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || echo "a build FAILED (see build.log)"; done
  cat "$OUT"/build_*.log > "$OUT/build.log" 2>/dev/null; rm -f "$OUT"/build_*.log; tail -n 8 "$OUT/build.log"
  if ls /tmp/wheels/*.whl >/dev/null 2>&1; then
    tar czf "$OUT/wheels.tgz" -C /tmp/wheels . && ls -la /tmp/wheels "$OUT/wheels.tgz"
    [ "$(stat -c %s "$OUT/wheels.tgz")" -gt 16000000 ] && { echo "wheels too large to come back"; rm "$OUT/wheels.tgz"; }
  fi
fi
python3 -c 'from simba_compress.ssm import kernels as k; print("mamba_ssm", k.mamba_ssm_available(), "causal_conv1d", k.causal_conv1d_available(), "triton", k.triton_available())'

if [[ " $STAGES " == *" tests "* ]]; then
  stage "tests"
  timeout ${TEST_SECONDS:-300} python3 -m pytest -q -rs tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -n 25 \
    || echo "GPU tests FAILED or timed out (see test_gpu.log)"
fi

if [[ " $STAGES " == *" bench "* ]]; then
  stage "benchmark"
  budget=${BENCH_SECONDS:-$((540 - (SECONDS - t0) - 40))}  # leave time for the profile and the files
  [ "$budget" -lt 60 ] && budget=60
  timeout $((budget + 60)) python3 benchmarks/gpu_prefill.py --out "$OUT" --max-seconds "$budget" --scan-kernels \
    || echo "benchmark FAILED or timed out (rows so far are in gpu_prefill.json)"
fi
stage "done"
ls -la "$OUT"
