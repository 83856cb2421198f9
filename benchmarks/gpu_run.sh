#!/usr/bin/env bash
# The GPU machine's runs, in stages (each guarded by a time limit; results land under $OUT as they come):
#   OUT=/some/folder STAGES="setup tests generate prefill" bash benchmarks/gpu_run.sh
# setup:    wheels of packages the image lacks (.whl/*.whl, e.g. pydantic) into /tmp/site; mamba_ssm and
#           causal_conv1d from .carry/cuda_site.tgz (their installed files), or .carry/wheels (whole wheels, or
#           pieces NAME.whl.part-* joined first), else built
#           from .carry/sdist/*.tar.gz for sm_90 in parallel (benchmarks/build_mamba_ssm.sh, ~4 minutes), the
#           built wheels then cut into pieces under 16 MB in $OUT/wheels so a later machine installs them in
#           seconds. A warm machine that has them skips all of this.
# tests:    tests/test_gpu.py and tests/test_generation.py (TEST_SECONDS)
# generate: benchmarks/gpu_generate.py (GEN_SECONDS; GEN_ARGS adds arguments), then without causal_conv1d
#           (NOCC_ARGS) for the dense-parity rows
# prefill:  benchmarks/gpu_prefill.py (PREFILL_SECONDS; PREFILL_ARGS)
# extra:    EXTRA_CMD, a command line run as is (other benchmarks), within EXTRA_SECONDS
set -uo pipefail
OUT=${OUT:-out/gpu}
STAGES=${STAGES:-setup tests generate prefill}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$SECONDS
stage() { echo "=== [$((SECONDS - t0)) s] $*"; }
has() { python3 -c "import torch, $1" >/dev/null 2>&1; }  # the extensions load only after torch (libc10)
on() { [[ " $STAGES " == *" $1 "* ]]; }
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

if on setup; then
  stage "setup"
  if [ ! -d /tmp/site ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site || echo "wheel install FAILED"
  fi
  # a tarball of both packages' files, their extensions stripped of symbols (48 MB instead of 54: it travels
  # beside the repository under the 64 MB limit), unpacked into /tmp/site
  if [ -f .carry/cuda_site.tgz ] && ! has selective_scan_cuda; then
    mkdir -p /tmp/site && tar xzf .carry/cuda_site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site
  fi
  for whole in $(ls .carry/wheels/*.whl.part-aa 2>/dev/null); do cat "${whole%.part-aa}".part-* > "${whole%.part-aa}"; done
  if ls .carry/wheels/*.whl >/dev/null 2>&1 && ! has selective_scan_cuda; then
    python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl || echo "prebuilt wheels FAILED to install"
  fi
  pids=()
  for pkg in mamba_ssm causal_conv1d; do
    mod=$([ $pkg = mamba_ssm ] && echo selective_scan_cuda || echo causal_conv1d_cuda)
    if has "$mod"; then echo "$pkg installed"; continue; fi
    sdist=$(ls .carry/sdist/$pkg-*.tar.gz 2>/dev/null | head -1)
    if [ -z "$sdist" ]; then echo "no $pkg wheel or sdist under .carry"; continue; fi
    WHEEL_DIR=/tmp/wheels MAX_JOBS=8 timeout 540 bash benchmarks/build_mamba_ssm.sh "$sdist" > "/tmp/build_$pkg.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || echo "a build FAILED (its log below)"; done
  tail -n 6 /tmp/build_*.log 2>/dev/null  # $OUT returns at most 8 files: the logs go into run.log
  if [ ${#pids[@]} -gt 0 ] && ls /tmp/wheels/*.whl >/dev/null 2>&1; then
    mkdir -p "$OUT/wheels"
    for w in /tmp/wheels/*.whl; do split -b 15m -a 2 "$w" "$OUT/wheels/$(basename "$w").part-"; done
    ls -la "$OUT/wheels"
  fi
fi
python3 -c 'from simba_compress import backends as b; print(b.describe())' \
  || echo "simba_compress does not import: see above"

if on tests; then
  stage "tests"
  # the Triton-interpreter tests run on the CPU (the suite's job), not here
  timeout ${TEST_SECONDS:-300} python3 -m pytest -q -rs --durations 8 tests/test_generation.py tests/test_gpu.py -k "not interpreter" \
    -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1 || echo "GPU tests FAILED or timed out (see test_gpu.log)"
  tail -n 30 "$OUT/test_gpu.log"
fi

if on generate; then
  stage "generate"
  timeout $((${GEN_SECONDS:-300} + 90)) python3 benchmarks/gpu_generate.py --out "$OUT" --max-seconds ${GEN_SECONDS:-300} \
    ${GEN_ARGS:-} || echo "gpu_generate FAILED or timed out"
  if [ -n "${NOCC_ARGS:-}" ]; then
    stage "generate without causal_conv1d"
    timeout 240 python3 benchmarks/gpu_generate.py --out "$OUT" --block causal_conv1d --tag _no_causal_conv1d \
      ${NOCC_ARGS} || echo "gpu_generate (no causal_conv1d) FAILED or timed out"
  fi
fi

if on prefill; then
  stage "prefill"
  timeout $((${PREFILL_SECONDS:-200} + 90)) python3 benchmarks/gpu_prefill.py --out "$OUT" \
    --max-seconds ${PREFILL_SECONDS:-200} ${PREFILL_ARGS:-} || echo "gpu_prefill FAILED or timed out"
fi

if on extra; then
  stage "extra: ${EXTRA_CMD:-}"
  timeout ${EXTRA_SECONDS:-300} bash -c "${EXTRA_CMD:-true}" || echo "extra command FAILED or timed out"
fi
stage "done"
ls -la "$OUT"
