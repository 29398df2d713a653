#!/usr/bin/env bash
# experiments/ioi.toml on the GPT-2-small-shaped fixture: tl-run against TransformerLens's
# patching.py, same machine, same run. Prints both times and the ratio.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
model="$(bench_model)"
out="$(mktemp -d)"
tl_run_s=$(python3 -c "
import subprocess, time
t = time.perf_counter()
subprocess.run(['target/release/tl-run', 'experiments/ioi.toml', '--model-id', '$model', '--out', '$out', '--quiet'], check=True, stdout=subprocess.DEVNULL)
print(round(time.perf_counter() - t, 2))")
# Same work as TL's timed part: the clean and corrupted runs plus the activation-patching sweeps
# (runs "resid" and "heads"; the spec's other kinds are timed by benches/kinds_vs_transformer_lens.sh).
patch_s=$(python3 -c "import json; m=json.load(open('$out/manifest.json'))['timings_seconds']; print(round(sum(v for k, v in m.items() if k == 'clean and corrupted runs' or k.startswith(('resid: patch ', 'heads: patch '))), 2))")
tl=$(HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore .venv/bin/python benches/gpu/tl_patching.py "$model" experiments/prompts/ioi.jsonl cpu float32 ioi /dev/null 2>/dev/null | tail -1)
tl_patch_s=$(python3 -c "import json; print(json.loads('$tl')['patching_s'])")
echo "tl-run whole command (load + runs + writes): ${tl_run_s}s; patching sweeps: ${patch_s}s"
echo "TransformerLens patching.py sweeps: ${tl_patch_s}s ($tl)"
python3 -c "print(f'speed-up on the patching sweeps: {$tl_patch_s / $patch_s:.1f}x')"
rm -rf "$out"
