#!/usr/bin/env bash
# The quality runs of the README on one H200, run side by side (small models leave the GPU mostly idle).
#   OUT=results/ bash benchmarks/h200_quality.sh quality mamba2
# quality: quality vs FLOPs at T=1024 and 4096 with calibrated schedules (issues 3 and 5); with mamba_ssm
#   built first (benchmarks/build_mamba_ssm.sh) the scans run in its kernel, else in the reference path.
# mamba2: the Mamba-2 proxy trained and pruned (issue 7).
# Needs the corpus and the l16 proxy under .carry/ and optuna's wheels in .whl/ (the GPU image has no
# optuna); the dense l12, l9 and l6 rows are merged from earlier runs (only 64 MiB travel to the machine).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
logs=()
for stage in "$@"; do
  case $stage in
  quality)
    common=(--models .carry/models --data .carry/corpus/valid.txt.xz --windows 64 --shallow
            --calib .carry/corpus/train.txt.xz --trials 40 --seed 0 --out "$OUT")
    python3 benchmarks/quality.py "${common[@]}" --seq-len 1024 --flops 0.8 0.75 0.7 0.6 0.5625 \
      --calibrate 0.75 0.6 0.5625 0.45 0.375 --objectives loss kl \
      --merge benchmarks/results/cpu/quality_T1024_l9_l6.json benchmarks/results/h200/quality_T1024_l12.json \
      > "$OUT/quality_T1024.log" 2>&1 &
    python3 benchmarks/quality.py "${common[@]}" --seq-len 4096 --batch-size 4 --flops 0.75 0.5625 --criteria simba \
      --calibrate 0.75 0.5625 0.375 --objectives loss kl \
      --merge benchmarks/results/cpu/quality_T4096_l9_l6.json benchmarks/results/h200/quality_T4096_l12.json \
      > "$OUT/quality_T4096.log" 2>&1 &
    logs+=("$OUT/quality_T1024.log" "$OUT/quality_T4096.log") ;;
  mamba2)
    python3 benchmarks/train_demo.py --corpus .carry/corpus --out "$OUT" --name train_mamba2 --layer mamba2 \
      --d-model 256 --n-layer 8 --d-state 64 --headdim 64 --batch 32 --steps 2000 --max-seconds 240 \
      --eval-flops 0.8 0.6 0.45 --no-save > "$OUT/train_mamba2_log.txt" 2>&1 &
    logs+=("$OUT/train_mamba2_log.txt") ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
wait
tail -n 4 "${logs[@]}"
