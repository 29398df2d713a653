#!/usr/bin/env bash
# Bundles the GPU checks into gpucheck/ (git-ignored, under the device tool's 64 MiB carry limit):
# the stripped release binary (gzip), the small models, the configs and tokenizers of the bench
# models (their weights are drawn on the GPU machine: gen_small.py, gen_llama.py), CPU reference
# activations, and TransformerLens 4.3 with the pure-Python wheels the GPU image lacks. There:
#   bash gpucheck/setup.sh           unpack the binary, install the wheels into /tmp/site
#   bash gpucheck/bench.sh ioi       TransformerLens vs tl-run on the same GPU (#13), f32 and bf16
#   bash gpucheck/bench.sh llama8b   the Llama-3-8B-shaped bf16 model (#13)
#   bash gpucheck/bench.sh startup   process floor, `tl-run hooks` and load GB/s, CPU and CUDA (#13)
#   bash gpucheck/run.sh             CUDA forward (every hook) and the IOI Parquet against CPU
#   bash gpucheck/kinds.sh           every experiment kind, CUDA against CPU
#   bash gpucheck/cluster.sh         split by layers over cuda:0+cpu, replicas on cuda:0+cpu
#   OUT=<dir> bash gpucheck/session.sh   one device call: ioi, startup, llama8b (no sweep), run.sh
# (OUT=<dir> for run/kinds/cluster outputs.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash scripts/setup.sh && bash scripts/fixtures.sh
cargo build --release --quiet
b=gpucheck
rm -rf "$b" && mkdir -p "$b/models" "$b/wheels"
strip -o "$b/tl-run" target/release/tl-run && gzip -6 "$b/tl-run"
cp benches/gpu/*.sh benches/gpu/*.py benches/gpu/*.toml benches/gpu/ioi100.jsonl "$b/"
# gpt2-odd (20 MB) stays behind for the carry limit; kinds.sh uses gpt2-tiny.
cp -rL fixtures/gpt2-tiny "$b/models/" && cp -r tests/models/stories260K "$b/models/"
mkdir -p "$b/experiments/prompts" "$b/benches" && cp experiments/*.toml "$b/experiments/" && cp experiments/prompts/*.jsonl "$b/experiments/prompts/"
cp benches/kinds.toml "$b/benches/" && chmod -R u+w "$b"
# Bench model shapes: GPT-2 small, SmolLM2-135M (its real config and tokenizer; the 93 MB GGUF
# does not fit the carry limit, so the weights are random), Llama-3-8B (32 layers, d_model 4096,
# 32/8 heads, MLP 14336, vocab 128256, bf16) with SmolLM2's tokenizer (copied there by setup.sh).
smol_tok="$HOME/.cache/tl-run/bench-fixtures/smollm2-hf"
[ -f "$smol_tok/tokenizer.json" ] || { mkdir -p "$smol_tok"; .venv/bin/python -c "
import sys; from transformers import AutoTokenizer
AutoTokenizer.from_pretrained('.models', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained(sys.argv[1])" "$smol_tok"; }
mkdir -p "$b/models/gpt2-small-shaped" "$b/models/smollm2-shaped" "$b/models/llama8b"
cp fixtures/gpt2-tiny/tokenizer_config.json "$b/models/gpt2-small-shaped/"
cp "$smol_tok/tokenizer.json" "$smol_tok/tokenizer_config.json" "$b/models/smollm2-shaped/"
.venv/bin/python - "$smol_tok/config.json" <<'PY'
import json, sys
gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768,
        "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
json.dump(gpt2, open("gpucheck/models/gpt2-small-shaped/config.json", "w"), indent=1)
smol = json.load(open(sys.argv[1]))
smol.pop("quantization_config", None); smol.pop("_model_name_or_path", None); smol["torch_dtype"] = smol.pop("dtype", "float32")
json.dump(smol, open("gpucheck/models/smollm2-shaped/config.json", "w"), indent=1)
llama8b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": smol["bos_token_id"], "eos_token_id": smol["eos_token_id"]}
json.dump(llama8b, open("gpucheck/models/llama8b/config.json", "w"), indent=1)
PY
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$b/wheels" \
  transformer-lens==4.3.0 transformers==5.24.0 huggingface_hub==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  typeguard==4.6.1 beartype==0.23.1 fancy-einsum==0.0.3 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
P1="When John and Mary went to the shops, John gave the bag to"
target/release/tl-run cache "$b/models/gpt2-tiny" --prompt "$P1" --prompt "Hi there" --out "$b/cpu_gpt2-tiny.safetensors"
target/release/tl-run cache "$b/models/stories260K" --prompt "Once upon a time, there was a little girl named Lily." --prompt "Tim ran." --out "$b/cpu_stories260K.safetensors"
du -sh "$b"
