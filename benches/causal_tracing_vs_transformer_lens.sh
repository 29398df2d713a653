#!/usr/bin/env bash
# Causal tracing on SmolLM2-135M (benches/causal_tracing_smollm2.toml: a prompt × 10 noise
# samples; resid_pre restored at every layer and position, mlp_out with ROME's window of 10)
# against ROME's loop in TransformerLens
# (benches/tl_causal_tracing.py: one forward of the clean prompt and its noised copies per cell)
# on the same dequantized weights, same machine, same run. Prints both times and the ratio.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
hf_dir="$HOME/.cache/tl-run/bench-fixtures/smollm2-hf"
mkdir -p "$hf_dir"
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error .venv/bin/python benches/tl_smollm2.py .models/SmolLM2-135M-Instruct.Q4_1.gguf "$hf_dir" 2>/dev/null
out="$(mktemp -d)"
ours=$(python3 -c "
import subprocess, time
t = time.perf_counter()
subprocess.run(['target/release/tl-run', 'benches/causal_tracing_smollm2.toml', '--out', '$out', '--quiet'], check=True, stdout=subprocess.DEVNULL)
print(round(time.perf_counter() - t, 2))")
cells=$(python3 -c "import json; m=json.load(open('$out/manifest.json')); print(sum(s['cells'] for r in m['runs'].values() for s in r['sweeps']))")
rm -rf "$out"
tl=$(HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error .venv/bin/python benches/tl_causal_tracing.py "$hf_dir" benches/causal_tracing_smollm2.toml 2>/dev/null | tail -1)
tl_s=$(python3 -c "import json; print(json.loads('$tl')['seconds'])")
echo "TransformerLens, ROME's loop (one forward per cell): ${tl_s}s ($tl)"
echo "tl-run (whole command, $cells cells): ${ours}s"
python3 -c "print(f'speed-up vs TransformerLens: {$tl_s / $ours:.1f}x')"
