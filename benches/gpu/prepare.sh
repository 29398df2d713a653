#!/usr/bin/env bash
# Bundles a GPU check into gpucheck/ (git-ignored): the release binary, two small models, CPU
# reference activations. On a CUDA machine with PyTorch 2.11 (the device tool's image):
#   bash gpucheck/run.sh        (OUT=<dir> for the outputs)
#   bash gpucheck/kinds.sh      (every experiment kind, CUDA against CPU)
#   bash gpucheck/cluster.sh    (split by layers over cuda:0+cpu, replicas on cuda:0+cpu)
# run.sh compares every hook of the CUDA forward with the CPU one, runs experiments/ioi.toml on
# CUDA and CPU and compares the Parquet, and times a GPT-2-small-shaped model it generates there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash scripts/setup.sh && bash scripts/fixtures.sh
cargo build --release --quiet
b=gpucheck
rm -rf "$b" && mkdir -p "$b/models/gpt2-small-shaped"
cp target/release/tl-run benches/gpu/run.sh benches/gpu/kinds.sh benches/gpu/cluster.sh benches/gpu/gen_small.py benches/gpu/compare.py "$b/"
cp -rL fixtures/gpt2-tiny fixtures/gpt2-odd "$b/models/" && cp -r tests/models/stories260K "$b/models/"
mkdir -p "$b/experiments/prompts" "$b/benches" && cp experiments/*.toml "$b/experiments/" && cp experiments/prompts/*.jsonl "$b/experiments/prompts/"
cp benches/kinds.toml "$b/benches/" && chmod -R u+w "$b"
.venv/bin/python - <<'PY'
import json
cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768,
       "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
json.dump(cfg, open("gpucheck/models/gpt2-small-shaped/config.json", "w"))
PY
cp fixtures/gpt2-tiny/tokenizer_config.json "$b/models/gpt2-small-shaped/"
P1="When John and Mary went to the shops, John gave the bag to"
"$b/tl-run" cache "$b/models/gpt2-tiny" --prompt "$P1" --prompt "Hi there" --out "$b/cpu_gpt2-tiny.safetensors"
"$b/tl-run" cache "$b/models/stories260K" --prompt "Once upon a time, there was a little girl named Lily." --prompt "Tim ran." --out "$b/cpu_stories260K.safetensors"
du -sh "$b"
