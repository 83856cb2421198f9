# Sourced by the staged GPU scripts (gpu_mamba2.sh, gpu_hybrid.sh): stages within one call of at most 10 minutes,
# each bounded by the time left (TOTAL_SECONDS, default 570, minus a reserve to pack the results), results packed into
# $OUT/results.tgz as they come. Expects OUT, RES, STAGES and SMOKE set.
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

if on setup && [ -z "$SMOKE" ]; then  # gpu_run.sh's setup: mamba_ssm and causal_conv1d from .carry
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
