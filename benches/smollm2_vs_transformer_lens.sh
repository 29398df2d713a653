#!/usr/bin/env bash
# benches/smollm2.toml on the real SmolLM2-135M-Instruct: tl-run against TransformerLens's
# patching.py on the same dequantized weights, same machine, same run. Prints the times and the
# ratios (sweeps: clean/corrupted runs + patching, TL's timed part; and the whole command).
# BENCH_DTYPES="float32 bfloat16" adds bf16 (on a CPU without native bf16 matmuls it is more
# than 20x slower than f32: a 2-core dev machine ran it for over 10 minutes before we stopped it).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
hf_dir="$HOME/.cache/tl-run/bench-fixtures/smollm2-hf"
mkdir -p "$hf_dir"
declare -A sweeps whole
dtypes="${BENCH_DTYPES:-float32}"
for dtype in $dtypes; do
  out="$(mktemp -d)"
  whole[$dtype]=$(python3 -c "
import subprocess, time
t = time.perf_counter()
subprocess.run(['target/release/tl-run', 'benches/smollm2.toml', '--dtype', '$dtype', '--out', '$out', '--quiet'], check=True, stdout=subprocess.DEVNULL)
print(round(time.perf_counter() - t, 2))")
  sweeps[$dtype]=$(python3 -c "import json; m=json.load(open('$out/manifest.json'))['timings_seconds']; print(round(sum(v for k, v in m.items() if k == 'clean and corrupted runs' or k.startswith(('resid: patch ', 'heads: patch '))), 2))")
  rm -rf "$out"
done
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error .venv/bin/python benches/tl_smollm2.py .models/SmolLM2-135M-Instruct.Q4_1.gguf "$hf_dir" 2>/dev/null
tl=$(HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error .venv/bin/python benches/gpu/tl_patching.py "$hf_dir" experiments/prompts/ioi.jsonl cpu float32 smollm2 /dev/null 2>/dev/null | tail -1)
tl_s=$(python3 -c "import json; print(round(json.loads('$tl')['patching_s'], 2))")
echo "TransformerLens patching.py (resid_pre by position + z by head, 8 IOI prompts): ${tl_s}s ($tl)"
for dtype in $dtypes; do
  echo "tl-run $dtype: sweeps ${sweeps[$dtype]}s, whole command ${whole[$dtype]}s"
  python3 -c "print(f'  speed-up vs TransformerLens: sweeps {$tl_s / ${sweeps[$dtype]}:.1f}x, whole command {$tl_s / ${whole[$dtype]}:.1f}x')"
done
