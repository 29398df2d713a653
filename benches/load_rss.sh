#!/usr/bin/env bash
# Peak host RSS while loading a generated 1.1B-parameter Llama checkpoint in bf16 (2.15 GB;
# benches/gen_llama_1b.py, made once under ~/.cache/tl-run/bench-fixtures/llama-1b), with
# --dtype bfloat16 and float32 (GPT-2 tokenizer, no BOS: its id is past the 32000-token vocabulary),
# against libtorch's own baseline (the same command on a tiny model).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
model="$HOME/.cache/tl-run/bench-fixtures/llama-1b"
if [ ! -f "$model/model.safetensors" ]; then
  .venv/bin/python benches/gen_llama_1b.py "$model"
  cp fixtures/gpt2-tiny/tokenizer.json fixtures/gpt2-tiny/tokenizer_config.json "$model/"
fi
file_kb=$(( $(stat -c %s "$model/model.safetensors") / 1024 ))
out="$(mktemp -d)"
peak() { /usr/bin/time -f "%M" target/release/tl-run cache "$1" --prompt "When John" --no-prepend-bos --hooks blocks.0.hook_resid_pre "${@:2}" --out "$out/o.safetensors" 2>&1 >/dev/null | tail -1; }
base=$(peak fixtures/llama-tiny)
for dtype in bfloat16 float32; do
  kb=$(peak "$model" --dtype $dtype)
  python3 -c "print(f'$dtype: peak RSS {$kb/2**20:.2f} GiB, {($kb-$base)/2**20:.2f} GiB above the {$base/2**20:.2f} GiB baseline = {($kb-$base)/$file_kb:.2f}x the {$file_kb/2**20:.2f} GiB file')"
done
rm -rf "$out"
