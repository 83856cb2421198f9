#!/usr/bin/env bash
# Issue 6 on a fresh GPU machine, in one command: build mamba_ssm, GPU tests, prefill benchmark.
#   OUT=/some/folder bash benchmarks/gpu_run.sh
# Needs .carry/sdist/mamba_ssm-2.3.2.post1.tar.gz, the wheels of packages the image lacks in .whl/ (pydantic:
# simba_compress imports it), optionally .carry/models/mamba-proxy-d320-l16 (the proxy test skips without it).
# BUILD_CAUSAL_CONV1D=1 also builds .carry/sdist/causal_conv1d-*.tar.gz, in parallel (about 330 s: it does not
# fit in one 10-minute command with the rest; without it both our path and transformers' use F.conv1d).
# Every stage is guarded and writes under $OUT as it goes (at most 8 files come back):
#   run.log (everything), build.log, test_gpu.log, gpu_prefill.json, gpu_prefill.md
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$SECONDS
stage() { echo "=== [$((SECONDS - t0)) s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || echo "wheel install FAILED"
fi
python3 -c 'import simba_compress; print("simba_compress imports")' || echo "simba_compress does not import: see above"

stage "build"
sdist=$(ls .carry/sdist/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
cc_sdist=$(ls .carry/sdist/causal_conv1d-*.tar.gz 2>/dev/null | head -1)
cc_pid=
if [ -n "$cc_sdist" ] && [ "${BUILD_CAUSAL_CONV1D:-0}" = 1 ]; then
  MAX_JOBS=6 timeout 480 bash benchmarks/build_mamba_ssm.sh "$cc_sdist" > "$OUT/build_causal_conv1d.log" 2>&1 &
  cc_pid=$!
fi
if [ -n "$sdist" ]; then
  MAX_JOBS=${cc_pid:+10} timeout 400 bash benchmarks/build_mamba_ssm.sh "$sdist" > "$OUT/build.log" 2>&1 \
    || echo "mamba_ssm build FAILED (tail of build.log below); continuing without it"
  tail -n 5 "$OUT/build.log"
else
  echo "no mamba_ssm sdist under .carry/sdist: the GPU path runs without mamba_ssm"
fi
if [ -n "$cc_pid" ]; then
  wait "$cc_pid" || echo "causal_conv1d build FAILED"
  tail -n 3 "$OUT/build_causal_conv1d.log"; cat "$OUT/build_causal_conv1d.log" >> "$OUT/build.log"; rm -f "$OUT/build_causal_conv1d.log"
fi
python3 -c 'from simba_compress.ssm import kernels as k; print("mamba_ssm", k.mamba_ssm_available(), "causal_conv1d", k.causal_conv1d_available(), "triton", k.triton_available())'

stage "tests"
timeout 200 python3 -m pytest -q -rs tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -n 25 \
  || echo "GPU tests FAILED or timed out (see test_gpu.log)"

stage "benchmark"
budget=$((540 - (SECONDS - t0) - 40))  # leave time for the profile and the files to be written
[ "$budget" -lt 60 ] && budget=60
timeout $((budget + 45)) python3 benchmarks/gpu_prefill.py --out "$OUT" --max-seconds "$budget" \
  || echo "benchmark FAILED or timed out (rows so far are in gpu_prefill.json)"
stage "done"
ls -la "$OUT"
