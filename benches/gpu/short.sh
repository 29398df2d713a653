#!/usr/bin/env bash
# benches/gpu/bench.sh in short mode, on CPU with tiny models, for CI (no timing gates): the
# GPT-2 slot is the gpt2-tiny fixture, the SmolLM2 and 8B slots are tiny Llama-architecture
# models that gen_llama.py draws (f32 and bf16) with the GPT-2 tokenizer, the 8B prompts are the
# 8 IOI prompts. It checks that every step ran and that TransformerLens and tl-run agree in f32
# (normalised metric, 1e-3 as in tests/activation_patching.rs).
# Usage (from the repository root, after scripts/setup.sh and scripts/fixtures.sh):
#   BIN=target/debug/tl-run bash benches/gpu/short.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
models="$work/models"; mkdir -p "$models"
ln -s "$(readlink -f fixtures/gpt2-tiny)" "$models/gpt2-small-shaped"
for m in smollm2-shaped llama8b; do
  mkdir -p "$models/$m"; cp fixtures/gpt2-tiny/tokenizer.json fixtures/gpt2-tiny/tokenizer_config.json "$models/$m/"
  dtype=float32; tie=true; [ $m = llama8b ] && dtype=bfloat16 && tie=false
  cat > "$models/$m/config.json" <<JSON
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 50257, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
 "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "$dtype", "tie_word_embeddings": $tie, "bos_token_id": 50256, "eos_token_id": 50256}
JSON
done
log="$work/log"
BIN="$root/${BIN:-target/release/tl-run}" PY="$root/.venv/bin/python" MODELS="$models" DEVICE=cpu WORK="$work/bench" \
  P_IOI="$root/experiments/prompts/ioi.jsonl" P_100="$root/experiments/prompts/ioi.jsonl" DTYPES="float32" \
  bash benches/gpu/bench.sh ioi llama8b startup 2>&1 | tee "$log"
# Every step ran, and in f32 the two implementations agree. Each check fails the script on its
# own (a `! grep` or the first half of `a && b` would not stop a `set -e` script).
fail() { echo "benches/gpu/short.sh: $*" >&2; exit 1; }
count() { grep -cE "$1" "$log" || true; }
need() { [ "$(count "$1")" = "$2" ] || fail "expected $2 lines matching '$1', found $(count "$1")"; }
has() { grep -qE "$1" "$log" || fail "no line matching '$1'"; }
if grep -q FAILED "$log"; then fail "a step FAILED"; fi
need '^(gpt2-small-shaped|smollm2-shaped)_float32 ' 2
awk '/^(gpt2-small-shaped|smollm2-shaped)_float32 /{ if ($NF + 0 > 1e-3) { print "TransformerLens and tl-run differ: " $0; exit 1 } }' "$log"
need '^(gpt2-small-shaped|smollm2-shaped)_float32: warm-up .* without it sweeps' 2
need '^(gpt2-small-shaped|smollm2-shaped)_float32: schedule by_position sweeps .* schedule staircase sweeps' 2
# The explicit attention steps agree with the fused kernel (normalised metric, 1e-3 as above).
need '^(gpt2-small-shaped|smollm2-shaped)_float32: fused attention sweeps .* explicit attention sweeps' 2
awk '/: fused attention sweeps/{ if ($NF + 0 > 1e-3) { print "fused and explicit attention differ: " $0; exit 1 } }' "$log"
need '^(gpt2-small-shaped|smollm2-shaped|llama8b): first-run weight digests? and plan [0-9.]+ s' 3
has 'attribution of every target'
has 'HF transformers forward\+backward'
has 'head x position sweep: .* \(complete\)'
# startup: three rounds on CPU and the "cuda" slot (DEVICE=cpu here), and the 8B slot's load.
need '^(cpu|cuda): +hooks [0-9.]+ s wall; cache [0-9.]+ s wall; load [0-9.]+ s .* GB/s' 6
has '^8B bf16 to cpu: hooks [0-9.]+ s wall'
echo "benches/gpu/short.sh: every step ran"
