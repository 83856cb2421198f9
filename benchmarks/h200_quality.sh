#!/usr/bin/env bash
# The quality runs of the README on one H200, concurrently (small models leave the GPU mostly idle):
# quality vs FLOPs at T=1024 and T=4096 with calibrated schedules (issues 3 and 5), and the Mamba-2 proxy
# trained and pruned (issue 7). The dense l12, l9 and l6 rows are merged from earlier runs (carry limit). Needs the corpus and the l16 proxy under .carry/, optuna's wheels in
# .whl/ (the GPU image has no optuna), and OUT set to the folder the results go to.
#   bash benchmarks/h200_quality.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
common=(--models .carry/models --data .carry/corpus/valid.txt.xz --windows 64 --shallow
        --calib .carry/corpus/train.txt.xz --trials 40 --seed 0 --out "$OUT")
python3 benchmarks/quality.py "${common[@]}" --seq-len 1024 --flops 0.8 0.75 0.7 0.6 0.5625 \
  --calibrate 0.75 0.6 0.5625 0.45 0.375 --objectives loss kl \
  --merge benchmarks/results/cpu/quality_T1024_l9_l6.json benchmarks/results/h200/quality_T1024_l12.json > "$OUT/quality_T1024.log" 2>&1 &
python3 benchmarks/quality.py "${common[@]}" --seq-len 4096 --batch-size 4 --flops 0.75 0.5625 --criteria simba \
  --calibrate 0.75 0.5625 0.375 --objectives loss kl \
  --merge benchmarks/results/cpu/quality_T4096_l9_l6.json benchmarks/results/h200/quality_T4096_l12.json > "$OUT/quality_T4096.log" 2>&1 &
python3 benchmarks/train_demo.py --corpus .carry/corpus --out "$OUT" --name train_mamba2 --layer mamba2 \
  --d-model 256 --n-layer 8 --d-state 64 --headdim 64 --batch 32 --steps 2000 --max-seconds 240 \
  --eval-flops 0.8 0.6 0.45 --no-save > "$OUT/train_mamba2_log.txt" 2>&1 &
wait
# at most 8 files come back from the machine: one log for the three runs
for f in "$OUT"/quality_T1024.log "$OUT"/quality_T4096.log "$OUT"/train_mamba2_log.txt; do
  echo "=== $(basename "$f")"; cat "$f"; rm "$f"
done > "$OUT/h200_quality_log.txt"
tail -n 30 "$OUT/h200_quality_log.txt"
