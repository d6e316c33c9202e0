#!/usr/bin/env bash
# Kill/resume check on the demo config: train N steps uninterrupted; train again, SIGTERM the
# process once it has logged step K, resume to N; compare per-step losses and final params.
# Usage: tools/resume_check.sh [N=60] [K=25] [extra overrides...]   Prints PASS/FAIL + max diff.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-60}; K=${2:-25}; shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d /tmp/bitgen-resume-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ARGS=(--config demo_cpu --no-progress "train.steps=$N" "optim.warmup_steps=$((N / 4))" train.log_every=1 "train.ckpt_every=$N" train.sample_every=0 "$@")

echo "[resume_check] uninterrupted run: $N steps"
"$PY" -m bitgen.cli train "${ARGS[@]}" --run-dir "$WORK/full" > "$WORK/full.log" 2>&1

echo "[resume_check] interrupted run: SIGTERM after step $K"
"$PY" -m bitgen.cli train "${ARGS[@]}" --run-dir "$WORK/cut" > "$WORK/cut.log" 2>&1 &
PID=$!
until [ -f "$WORK/cut/metrics.jsonl" ] && [ "$(wc -l < "$WORK/cut/metrics.jsonl")" -ge "$K" ]; do
  kill -0 "$PID" 2>/dev/null || { echo "FAIL: run ended before step $K"; cat "$WORK/cut.log"; exit 1; }
  sleep 0.2
done
kill -TERM "$PID"
set +e; wait "$PID"; RC=$?; set -e
echo "[resume_check] interrupted run exited with $RC (143 = saved after SIGTERM)"
[ "$RC" -eq 143 ] || { echo "FAIL: expected exit 143"; tail -20 "$WORK/cut.log"; exit 1; }

echo "[resume_check] resuming to step $N"
"$PY" -m bitgen.cli train "${ARGS[@]}" --run-dir "$WORK/cut" --resume > "$WORK/resume.log" 2>&1

"$PY" - "$WORK/full" "$WORK/cut" <<'PYEOF'
import json, sys
from bitgen.train.loop import max_param_difference
full, cut = sys.argv[1], sys.argv[2]
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl"))}
a, b = losses(full), losses(cut)
loss_diff = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else float("inf")
param_diff = max_param_difference(full, cut)
ok = loss_diff == 0.0 and param_diff == 0.0
print(f"{'PASS' if ok else 'FAIL'}: {len(a)} steps, max |loss diff| = {loss_diff:.3e}, "
      f"max |param diff| = {param_diff:.3e}")
sys.exit(0 if ok else 1)
PYEOF
