#!/usr/bin/env bash
# GPU check of every experiment kind (run on the device, from gpucheck/ as bundled by
# benches/gpu/prepare.sh): each spec in experiments/ on CUDA and on CPU, every Parquet value
# compared; then benches/kinds.toml timed on CUDA and CPU on a GPT-2-small-shaped model.
set -uo pipefail
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
nvidia-smi -L
for case in "ioi.toml gpt2-tiny" "ioi.toml stories260K" "causal_tracing.toml gpt2-tiny" "induction.toml stories260K" "induction.toml gpt2-tiny"; do
  set -- $case
  spec="experiments/$1"; model="$2"; extra=()
  if [ "$model" = stories260K ] && grep -q '^\[prompts\]' "$spec"; then extra=(--prompts experiments/prompts/stories.jsonl); fi
  for dev in cuda cpu; do
    ./tl-run "$spec" --model-id "models/$model" --device $dev --out "$OUT/${1%.toml}_${model}_$dev" --quiet "${extra[@]}" > /dev/null || echo "FAILED $case $dev"
  done
done
python3 - "$OUT" <<'PY'
import glob, os, sys
import pyarrow.parquet as pq
out = sys.argv[1]
worst = 0.0
for cuda_dir in sorted(glob.glob(f"{out}/*_cuda")):
    cpu_dir = cuda_dir[:-5] + "_cpu"
    for f in sorted(glob.glob(f"{cuda_dir}/*.parquet")):
        a, b = pq.read_table(f), pq.read_table(os.path.join(cpu_dir, os.path.basename(f)))
        assert a.num_rows == b.num_rows, f
        d = 0.0
        for col in ("value", "patched"):
            for x, y in zip(a.column(col).to_pylist(), b.column(col).to_pylist()):
                if x is not None and y is not None:
                    d = max(d, abs(x - y))
        same_tokens = a.column("token_id").to_pylist() == b.column("token_id").to_pylist()
        worst = max(worst, d)
        print(f"{os.path.basename(cuda_dir)[:-5]:<28} {os.path.basename(f):<26} rows {a.num_rows:>6}  max |cuda - cpu| {d:.2e}  top-k tokens equal {same_tokens}")
print("MAX", worst)
PY
cp models/gpt2-tiny/tokenizer.json models/gpt2-small-shaped/ 2>/dev/null
[ -f models/gpt2-small-shaped/model.safetensors ] || python3 gen_small.py models/gpt2-small-shaped
for dev in cuda cpu; do
  /usr/bin/time -f "$dev kinds.toml wall %e s" ./tl-run benches/kinds.toml --model-id models/gpt2-small-shaped --device $dev --out "$OUT/kinds_$dev" --quiet > /dev/null
  python3 -c "import json; t=json.load(open('$OUT/kinds_$dev/manifest.json'))['timings_seconds']; print('$dev', {k: round(v, 3) for k, v in t.items() if not k.startswith(('load', 'tokenize'))})"
done
