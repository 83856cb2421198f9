#!/usr/bin/env bash
# Issue 14 on one H200, in one call: the passkey proxies are fine-tuned and every long-context cell is measured in
# the same run (a model cannot come back from the machine). About 6 minutes; results land in $OUT as they come.
#   OUT=/some/folder bash benchmarks/long_context_gpu.sh
# Needs, inside the repository (gitignored, carried): .carry/models/mamba-proxy-d320-l16 and -l9 (../shared/models;
# without l9 its rows are skipped), .carry/corpus/valid.txt.xz and either .carry/corpus/train_pieces.pt (4.8 MB:
#   python benchmarks/passkey_proxy.py --base ../shared/models/mamba-proxy-d320-l16 \
#       --train ../shared/corpus/train.txt.xz --save-pieces .carry/corpus/train_pieces.pt)
# or train.txt.xz (12 MB); and .whl/ with pydantic's wheels (simba_compress imports it). mamba_ssm (training needs
# its scan's backward) comes from the machine or from what benchmarks/gpu_run.sh's setup stage installs or builds
# (its time is taken off the run's). MAX_SECONDS (default 300) bounds the benchmark from its start.
set -uo pipefail
OUT=${OUT:-out/long_context}
mkdir -p "$OUT"
t0=$SECONDS
OUT="$OUT" STAGES=setup bash benchmarks/gpu_run.sh  # writes $OUT/run.log
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
python3 -c "import selective_scan_cuda" 2>/dev/null || echo "WARNING: no mamba_ssm: fine-tuning runs the reference scan (slow)"
budget=$((570 - (SECONDS - t0) - 40))  # the call's 10 minutes, less the setup, the start-up and the last cell
max=${MAX_SECONDS:-300}
[ "$budget" -lt "$max" ] && max=$budget
echo "=== long_context.py, $max s"
python3 benchmarks/long_context.py --models .carry/models --corpus .carry/corpus --out "$OUT" --max-seconds "$max" "$@" \
  2>&1 | tee "$OUT/long_context_log.txt"
