#!/usr/bin/env bash
# The proxies this project trains on the GPU machine, in one call of at most 10 minutes (the models are small:
# the three runs share the one GPU):
#   1. benchmarks/train_proxy.py --kind mamba2 and --kind hybrid, together, through mamba_ssm's Triton kernels
#      (its source on PYTHONPATH: Mamba-2 and attention need no CUDA extension), each within TRAIN_SECONDS;
#   2. meanwhile mamba_ssm's CUDA extension builds (the Mamba-1 scan's backward), then benchmarks/passkey_proxy.py
#      fine-tunes mamba-proxy-d320-l16 into the passkey proxy;
#   3. with TEST_SECONDS set, the GPU tests run meanwhile (test_gpu.log);
#   4. each model folder is packed as NAME.tar and cut into pieces under 16 MB. The machine returns at most
#      64 MB a call, so the Mamba-2 and hybrid proxies go to $OUT and the passkey proxy waits in $KEEP/packed for
#      a second call on the warm machine: `cp $KEEP/packed/* $OUT/`.
# Here, unpack the pieces with `python benchmarks/proxies.py PIECES...` (into ~/.cache/simba-compress/proxies).
#   OUT=/some/folder bash benchmarks/gpu_proxies.sh
# Needs, inside the repository (gitignored, carried): .carry/corpus/{train.txt.xz,valid.txt.xz,tokenizer/},
# .carry/models/mamba-proxy-d320-l16, .carry/sdist/mamba_ssm-*.tar.gz, .whl/ (einops, pydantic's wheels).
set -uo pipefail
OUT=${OUT:-out/proxies}
KEEP=${KEEP:-/root/keep}
TRAIN_SECONDS=${TRAIN_SECONDS:-400}
KINDS=${KINDS:-mamba2 hybrid}  # which of the two proxies to train
PASSKEY_OUT=${PASSKEY_OUT:-}   # set: the passkey proxy's pieces go to $OUT too (when only one other proxy is trained)
mkdir -p "$OUT" "$KEEP/packed"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$SECONDS
stage() { echo "=== [$((SECONDS - t0)) s] $*"; }

stage "setup"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site
sdist=$(ls .carry/sdist/mamba_ssm-*.tar.gz | head -1)
mkdir -p /tmp/mamba_src && tar xzf "$sdist" -C /tmp/mamba_src && src=$(ls -d /tmp/mamba_src/*/)
WHEEL_DIR=/tmp/wheels MAX_JOBS=12 timeout 400 bash benchmarks/build_mamba_ssm.sh "$sdist" > /tmp/build.log 2>&1 &
build=$!

stage "train the Mamba-2 and hybrid proxies (mamba_ssm's Triton kernels, from its source)"
pids=()
for kind in $KINDS; do
  PYTHONPATH=/tmp/site:$src timeout $((TRAIN_SECONDS + 150)) python3 benchmarks/train_proxy.py --kind $kind \
    --corpus .carry/corpus --out "$KEEP" --max-seconds "$TRAIN_SECONDS" > "/tmp/train_$kind.log" 2>&1 &
  pids+=($!)
done

wait $build && stage "mamba_ssm built" || { echo "mamba_ssm build FAILED"; tail -5 /tmp/build.log; }
tail -n 3 /tmp/build.log
stage "passkey proxy (mamba-proxy-d320-l16 fine-tuned)"
timeout 300 python3 benchmarks/passkey_proxy.py --base .carry/models/mamba-proxy-d320-l16 \
  --train .carry/corpus/train.txt.xz --valid .carry/corpus/valid.txt.xz --out "$KEEP/mamba-proxy-d320-l16-passkey" \
  > /tmp/passkey.log 2>&1 || echo "passkey proxy FAILED"
tail -n 4 /tmp/passkey.log
if [ -n "${TEST_SECONDS:-}" ]; then  # the GPU tests meanwhile, on the shared GPU (their timings are not measured)
  stage "GPU tests (tests/test_gpu.py, tests/test_generation.py, tests/test_layers.py) within $TEST_SECONDS s"
  timeout "$TEST_SECONDS" python3 -m pytest -q -rs --durations 5 -p no:cacheprovider tests/test_gpu.py \
    tests/test_generation.py tests/test_layers.py -k "not interpreter" > "$OUT/test_gpu.log" 2>&1 \
    || echo "GPU tests FAILED or timed out (see test_gpu.log)"
  tail -n 25 "$OUT/test_gpu.log"
fi
for p in "${pids[@]}"; do wait "$p" || echo "a training run FAILED"; done
for kind in $KINDS; do stage "train_proxy $kind"; grep -E "^\{|Error|error" "/tmp/train_$kind.log" | tail -n 8; done

stage "pack"
for name in mamba2-proxy-d320-l16 hybrid-proxy-d320-l16 mamba-proxy-d320-l16-passkey; do
  [ -d "$KEEP/$name" ] || { echo "$name missing"; continue; }
  dest=$OUT; [ "$name" = mamba-proxy-d320-l16-passkey ] && [ -z "$PASSKEY_OUT" ] && dest=$KEEP/packed
  tar cf - -C "$KEEP" "$name" | split -b 15m -a 2 - "$dest/$name.tar.part-"
done
ls -la "$OUT" "$KEEP/packed"
stage "done"
