#!/usr/bin/env bash
# #13's GPU bench: TransformerLens 4.3 against tl-run on the same device in the same run, and the
# Llama-3-8B-shaped bf16 model. Run from the bundle benches/gpu/prepare.sh makes (gpucheck/):
#
#   bash gpucheck/bench.sh ioi       GPT-2-small-shaped and SmolLM2-135M-shaped (random weights, the
#                                    real config and tokenizer), f32 and bf16: TL vs tl-run table
#   bash gpucheck/bench.sh llama8b   the 8B model: attribution of every target against one forward +
#                                    backward, the head x position sweep of 100 IOI prompts, peak memory
#   bash gpucheck/bench.sh startup   process start, `tl-run hooks`, `tl-run cache` (CPU and CUDA) and load GB/s on the
#                                    GPT-2-small-shaped model; with the 8B model present, its load to CUDA
#
# DEVICE (default cuda), HEADS_LIMIT (seconds for the 8B sweep, default 420), WORK (default
# /tmp/tl-run-bench). benches/gpu/short.sh runs the same steps on CPU with tiny models in CI
# (no timing gates): BIN, PY and MODELS point it at the repository's build, venv and fixtures.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$here/tl-run}"; PY="${PY:-python3}"; MODELS="${MODELS:-$here/models}"
DEVICE="${DEVICE:-cuda}"; WORK="${WORK:-/tmp/tl-run-bench}"; HEADS_LIMIT="${HEADS_LIMIT:-420}"
P_IOI="${P_IOI:-$here/experiments/prompts/ioi.jsonl}"; P_100="${P_100:-$here/ioi100.jsonl}"
DTYPES="${DTYPES:-float32 bfloat16}"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
mkdir -p "$WORK"
now() { date +%s.%N; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

poll_gpu_memory() {  # MiB used on the GPU every 100 ms into $1, until killed
  if command -v nvidia-smi > /dev/null && [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" 2>/dev/null &
  else
    sleep 100000 > /dev/null &
  fi
  echo $!
}

ioi() {
  ls "$MODELS/gpt2-small-shaped/"model*.safetensors > /dev/null 2>&1 || "$PY" "$here/gen_small.py" "$MODELS/gpt2-small-shaped"
  ls "$MODELS/smollm2-shaped/"model*.safetensors > /dev/null 2>&1 || "$PY" "$here/gen_llama.py" "$MODELS/smollm2-shaped" > /dev/null
  for case in "gpt2-small-shaped ioi_patching.toml ioi" "smollm2-shaped smollm2_patching.toml smollm2"; do
    set -- $case
    # A weight file's sha256 (in every job key) is computed by the first command that reads the
    # file on a machine and cached under its path, size and mtime (~/.cache/tl-run/digests.json);
    # timed apart here, so that every dtype's row times what every later run pays.
    t0=$(now)
    "$BIN" plan "$here/$2" --model-id "$MODELS/$1" --prompts "$P_IOI" > /dev/null || echo "FAILED tl-run plan $1"
    echo "$1: first-run weight digest and plan $(minus $(now) $t0) s"
    for dtype in $DTYPES; do
      tag="${1}_$dtype"
      rm -rf "$WORK/tlrun_$tag"
      t0=$(now)
      "$BIN" run "$here/$2" --model-id "$MODELS/$1" --device "$DEVICE" --dtype "$dtype" --prompts "$P_IOI" --out "$WORK/tlrun_$tag" --quiet > /dev/null \
        || { echo "FAILED tl-run $tag"; continue; }
      t1=$(now)
      "$PY" "$here/tl_patching.py" "$MODELS/$1" "$P_IOI" "$DEVICE" "$dtype" "$3" "$WORK/tl_$tag.json" > /dev/null 2> "$WORK/tl_$tag.err" \
        || { echo "FAILED TransformerLens $tag:"; tail -5 "$WORK/tl_$tag.err"; rm -f "$WORK/tl_$tag.json"; continue; }
      t2=$(now)
      # The same tl-run command without the device warm-up beside the load (engine/warm.rs).
      rm -rf "$WORK/tlrun_nowarm_$tag"
      TL_RUN_WARM_UP=0 "$BIN" run "$here/$2" --model-id "$MODELS/$1" --device "$DEVICE" --dtype "$dtype" --prompts "$P_IOI" --out "$WORK/tlrun_nowarm_$tag" --quiet > /dev/null || echo "FAILED tl-run without warm-up $tag"
      t3=$(now)
      # And with the other patching schedule (staircase on CUDA, by position on the CPU; see
      # activation_patching::Schedule).
      other=$([ "$DEVICE" = cpu ] && echo staircase || echo by_layer)
      rm -rf "$WORK/tlrun_other_$tag"
      TL_RUN_PATCH_SCHEDULE=$other "$BIN" run "$here/$2" --model-id "$MODELS/$1" --device "$DEVICE" --dtype "$dtype" --prompts "$P_IOI" --out "$WORK/tlrun_other_$tag" --quiet > /dev/null || echo "FAILED tl-run with the $other schedule $tag"
      t4=$(now)
      # And with attention as explicit steps everywhere (engine/attention.rs: the fused kernel
      # is the default where scores and pattern are not hooked).
      rm -rf "$WORK/tlrun_explicit_$tag"
      "$BIN" run "$here/$2" --attention explicit --model-id "$MODELS/$1" --device "$DEVICE" --dtype "$dtype" --prompts "$P_IOI" --out "$WORK/tlrun_explicit_$tag" --quiet > /dev/null || echo "FAILED tl-run with explicit attention $tag"
      t5=$(now)
      echo "{\"tl_run\": $(minus $t1 $t0), \"tl\": $(minus $t2 $t1), \"tl_run_no_warm_up\": $(minus $t3 $t2), \"tl_run_other_schedule\": $(minus $t4 $t3), \"tl_run_explicit_attention\": $(minus $t5 $t4)}" > "$WORK/wall_$tag.json"
      echo "$tag: tl-run $(minus $t1 $t0) s, TransformerLens $(minus $t2 $t1) s, tl-run without the warm-up $(minus $t3 $t2) s, with the $other schedule $(minus $t4 $t3) s, with explicit attention $(minus $t5 $t4) s (whole processes)"
    done
  done
  "$PY" "$here/tables.py" ioi "$WORK"
}

llama8b() {
  local m="$MODELS/llama8b"
  ls "$m"/model*.safetensors > /dev/null 2>&1 || { t0=$(now); "$PY" "$here/gen_llama.py" "$m" && echo "generated in $(minus $(now) $t0) s"; }
  # The 15 GiB's first-run digests, timed apart as in ioi().
  t0=$(now)
  "$BIN" plan "$here/llama8b_atp.toml" --model-id "$m" --prompts "$P_100" > /dev/null || echo "FAILED tl-run plan llama8b"
  echo "llama8b: first-run weight digests and plan $(minus $(now) $t0) s"
  poll=$(poll_gpu_memory "$WORK/gpumem_atp.csv")
  t0=$(now)
  "$BIN" run "$here/llama8b_atp.toml" --model-id "$m" --device "$DEVICE" --prompts "$P_100" --out "$WORK/atp" --fresh --quiet > /dev/null || echo "FAILED 8B attribution"
  t1=$(now); kill $poll 2>/dev/null
  "$BIN" plan "$here/llama8b_heads.toml" --model-id "$m" --device "$DEVICE" --prompts "$P_100" --json > "$WORK/plan_heads.json" 2>/dev/null
  rm -rf "$WORK/heads"
  poll=$(poll_gpu_memory "$WORK/gpumem_heads.csv")
  t2=$(now)
  timeout "$HEADS_LIMIT" "$BIN" run "$here/llama8b_heads.toml" --model-id "$m" --device "$DEVICE" --prompts "$P_100" --out "$WORK/heads" --quiet > /dev/null \
    || echo "8B head x position sweep: stopped or failed (exit $?)"
  t3=$(now); kill $poll 2>/dev/null
  echo "{\"atp\": $(minus $t1 $t0), \"heads\": $(minus $t3 $t2), \"heads_start\": $t2}" > "$WORK/wall_llama8b.json"
  timeout 150 "$PY" "$here/hf_fwd_bwd.py" "$m" "$P_100" "$DEVICE" bfloat16 > "$WORK/hf_fwd_bwd.json" 2> "$WORK/hf_fwd_bwd.err" \
    || { echo "HF forward+backward reference failed:"; tail -3 "$WORK/hf_fwd_bwd.err"; }
  "$PY" "$here/tables.py" llama8b "$WORK"
}

# Start-up as #13 measures it: the process floor, `tl-run hooks` (the checkpoint checked, no
# weight values read) and a full start-up, `tl-run cache` of one prompt and one hook, on CPU and
# CUDA, with that load's read+convert and processing times (its -vv log) against the file's size.
startup() {
  local m="$MODELS/gpt2-small-shaped"
  ls "$m"/model*.safetensors > /dev/null 2>&1 || "$PY" "$here/gen_small.py" "$m"
  cat "$m"/model*.safetensors > /dev/null
  local acts; acts="$(mktemp -d)/acts.safetensors"
  load_line() {  # $1 model, rest: flags; prints hooks and cache walls, read+convert, process, GB/s
    local bytes t0 log hooks wall
    bytes=$(cat "$1"/model*.safetensors | wc -c)
    t0=$(now); "$BIN" hooks "$@" > /dev/null; hooks=$(minus $(now) $t0)
    t0=$(now)
    log=$("$BIN" cache "$1" --prompt "When Mary and John went to the store, John gave a drink to" --no-prepend-bos \
      --hooks blocks.0.hook_resid_pre --out "$acts" "${@:2}" -vv 2>&1 >/dev/null | sed 's/\x1b\[[0-9;]*m//g')
    wall=$(minus $(now) $t0)
    local r p; r=$(echo "$log" | grep -o 'TransformerLens layout seconds=[0-9.]*' | cut -d= -f2); p=$(echo "$log" | grep -o 'processed and placed seconds=[0-9.]*' | cut -d= -f2)
    echo "$hooks $wall $r $p" | awk -v b="$bytes" '{ printf "hooks %.2f s wall; cache %.2f s wall; load %.2f s (read+convert %.2f, process+place %.2f) = %.2f GB/s of %.2f GB\n", $1, $2, $3 + $4, $3, $4, b / ($3 + $4) / 1e9, b / 1e9 }'
  }
  for i in 1 2 3; do
    t0=$(now); "$BIN" --version > /dev/null; echo "floor (tl-run --version) $(minus $(now) $t0) s"
    echo "cpu:  $(load_line "$m")"
    echo "cuda: $(load_line "$m" --device "$DEVICE")"
  done
  if ls "$MODELS/llama8b"/model*.safetensors > /dev/null 2>&1; then
    cat "$MODELS/llama8b"/model*.safetensors > /dev/null
    echo "8B bf16 to $DEVICE: $(load_line "$MODELS/llama8b" --device "$DEVICE" --dtype bfloat16)"
  fi
  rm -rf "$(dirname "$acts")"
}

for part in "${@:-ioi llama8b}"; do
  for p in $part; do "$p"; done
done
