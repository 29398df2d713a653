#!/usr/bin/env bash
# GPU check: CUDA forward equals the CPU forward (all hooks, padded batch) on two models;
# the IOI spec on CUDA equals it on CPU; timings on a GPT-2-small-shaped model.
set -uo pipefail
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())'
python3 -c 'import pyarrow; print("pyarrow", pyarrow.__version__)' || echo "no pyarrow"
P1="When John and Mary went to the shops, John gave the bag to"
./tl-run cache models/gpt2-tiny --device cuda --prompt "$P1" --prompt "Hi there" --out "$OUT/cuda_gpt2-tiny.safetensors"
python3 compare.py cpu_gpt2-tiny.safetensors "$OUT/cuda_gpt2-tiny.safetensors" | tail -1
./tl-run cache models/stories260K --device cuda --prompt "Once upon a time, there was a little girl named Lily." --prompt "Tim ran." --out "$OUT/cuda_stories.safetensors"
python3 compare.py cpu_stories260K.safetensors "$OUT/cuda_stories.safetensors" | tail -1
cp models/gpt2-tiny/tokenizer.json models/gpt2-small-shaped/
[ -f models/gpt2-small-shaped/model.safetensors ] || python3 gen_small.py models/gpt2-small-shaped
for dev in cuda cpu; do
  /usr/bin/time -f "$dev wall %e s" ./tl-run ../experiments/ioi.toml --model-id models/gpt2-small-shaped --device $dev --out "$OUT/ioi_$dev" --quiet | tail -12
  python3 -c "import json; m=json.load(open('$OUT/ioi_$dev/manifest.json')); t=m['timings_seconds']; print('$dev', {k: round(v, 3) for k, v in t.items()})"
done
/usr/bin/time -f "cuda tiny wall %e s" ./tl-run ../experiments/ioi.toml --model-id models/gpt2-tiny --device cuda --out "$OUT/tiny_cuda" --quiet > /dev/null
./tl-run ../experiments/ioi.toml --model-id models/gpt2-tiny --device cpu --out "$OUT/tiny_cpu" --quiet > /dev/null
python3 - "$OUT" <<'PY'
import sys, json
out = sys.argv[1]
for name in ("ioi", "tiny"):
    a = json.load(open(f"{out}/{name}_cuda/manifest.json"))["metric"]; b = json.load(open(f"{out}/{name}_cpu/manifest.json"))["metric"]
    d = max(abs(x - y) for x, y in zip(a["clean_per_prompt"] + a["corrupted_per_prompt"], b["clean_per_prompt"] + b["corrupted_per_prompt"]))
    print(name, "baselines max diff cuda vs cpu", d)
    try:
        import pyarrow.parquet as pq
        for run in ("resid", "heads"):
            x = pq.read_table(f"{out}/{name}_cuda/{run}.parquet").column("value").to_pylist()
            y = pq.read_table(f"{out}/{name}_cpu/{run}.parquet").column("value").to_pylist()
            print(name, run, "parquet max diff cuda vs cpu", max(abs(p - q) for p, q in zip(x, y)))
    except ImportError:
        pass
PY
rm -f "$OUT"/ioi_*/*.parquet.tmp* 2>/dev/null
