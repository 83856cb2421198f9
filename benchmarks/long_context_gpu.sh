#!/usr/bin/env bash
# Issue 14 on one H200, in one call: the passkey proxies are fine-tuned and every long-context cell is measured in
# the same run (a model cannot come back from the machine). About 6 minutes; results land in $OUT as they come.
#   OUT=/some/folder bash benchmarks/long_context_gpu.sh
# Needs, inside the repository (gitignored, carried): .carry/models/mamba-proxy-d320-{l16,l9} (../shared/models),
# .carry/corpus/{train,valid}.txt.xz (../shared/corpus), and .whl/ with pydantic's wheels (simba_compress imports
# pydantic; the image has none). Training needs mamba_ssm (its scan has a backward): installed on the image, or
# wheels in .carry/wheels (benchmarks/build_mamba_ssm.sh makes them). MAX_SECONDS (default 300) bounds the cells.
set -uo pipefail
OUT=${OUT:-out/long_context}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec > >(tee -a "$OUT/long_context_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import selective_scan_cuda" 2>/dev/null && ls .carry/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl
fi
python3 -c "import selective_scan_cuda" 2>/dev/null || echo "WARNING: no mamba_ssm: fine-tuning runs the reference scan (slow)"
python3 -c 'import torch, simba_compress; print("torch", torch.__version__, "simba_compress imports")'
python3 benchmarks/long_context.py --models .carry/models --corpus .carry/corpus --out "$OUT" \
  --max-seconds "${MAX_SECONDS:-300}" "$@"
