#!/usr/bin/env bash
# One device call's worth of #13's GPU checks, most valuable first, everything logged to
# $OUT/log.txt as it goes (a call stopped at its limit still returns what ran):
#   bench.sh ioi (TransformerLens vs tl-run, f32 and bf16), the tl-run manifests (per-job
#   timings) as one tarball, bench.sh startup, bench.sh llama8b without the head x position
#   sweep (HEADS_LIMIT=1; set HEADS_LIMIT=420 for it), then run.sh (CUDA against CPU).
# Run on the GPU machine from the bundle prepare.sh makes: OUT=<dir> bash gpucheck/session.sh
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/tl-run-session}"; mkdir -p "$OUT"
export WORK="${WORK:-/tmp/tl-run-bench}"
{
  bash "$here/setup.sh"
  export PYTHONPATH=/tmp/site LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
  nvidia-smi -L; nproc
  echo "== bench.sh ioi"; bash "$here/bench.sh" ioi
  (cd "$WORK" && tar czf "$OUT/ioi-manifests.tgz" tlrun_*/manifest.json tl_*.json wall_*.json)
  echo "== bench.sh startup"; bash "$here/bench.sh" startup
  echo "== bench.sh llama8b"; HEADS_LIMIT="${HEADS_LIMIT:-1}" bash "$here/bench.sh" llama8b
  cp "$WORK/atp/manifest.json" "$OUT/atp8b-manifest.json" 2>/dev/null
  echo "== run.sh"; mkdir -p "$OUT/run"; OUT="$OUT/run" bash "$here/run.sh"
  rm -rf "$OUT/run"/ioi_* "$OUT/run"/tiny_*
} 2>&1 | tee "$OUT/log.txt"
