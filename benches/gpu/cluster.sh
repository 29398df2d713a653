#!/usr/bin/env bash
# GPU check of the scale-out paths (run on the device, from gpucheck/ as bundled by
# benches/gpu/prepare.sh): a model split by layers over cuda:0 and cpu, and data-parallel
# replicas on cuda:0 and cpu, each against the CPU run: every hook of the split forward, every
# Parquet value of experiments/ioi.toml, and the wall times.
set -uo pipefail
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
nvidia-smi -L
P1="When John and Mary went to the shops, John gave the bag to"
for m in gpt2-tiny stories260K; do
  # The prompts prepare.sh cached the CPU references with.
  p="$P1"; q="Hi there"; [ $m = stories260K ] && p="Once upon a time, there was a little girl named Lily." && q="Tim ran."
  ./tl-run cache models/$m --split cuda:0,cpu --prompt "$p" --prompt "$q" --out "$OUT/split_$m.safetensors" > /dev/null || echo "FAILED split cache $m"
  echo -n "$m split cuda:0,cpu vs cpu, every hook: "; python3 compare.py cpu_$m.safetensors "$OUT/split_$m.safetensors" | tail -1
done
[ -f models/gpt2-small-shaped/model.safetensors ] || { cp models/gpt2-tiny/tokenizer.json models/gpt2-small-shaped/; python3 gen_small.py models/gpt2-small-shaped; }
for mode in "cpu" "split --devices cuda:0,cpu --split-layers" "replicas --devices cuda:0,cpu" "cuda --device cuda"; do
  set -- $mode; name=$1; shift
  args=("$@"); [ "$name" = cpu ] && args=(--device cpu)
  /usr/bin/time -f "$name wall %e s" ./tl-run ../experiments/ioi.toml --model-id models/gpt2-small-shaped "${args[@]}" --out "$OUT/ioi_$name" --quiet | grep jobs || echo "FAILED $name"
done
python3 - "$OUT" <<'PY'
import sys, glob, os
out = sys.argv[1]
try:
    import pyarrow.parquet as pq
except ImportError:
    sys.exit("no pyarrow")
for name in ("split", "replicas", "cuda"):
    worst = 0.0
    for f in sorted(glob.glob(f"{out}/ioi_cpu/*.parquet")):
        a = pq.read_table(f).column("value").to_pylist()
        b = pq.read_table(f"{out}/ioi_{name}/{os.path.basename(f)}").column("value").to_pylist()
        worst = max([worst] + [abs(x - y) for x, y in zip(a, b)])
    print(name, "vs cpu: max |value diff| over every run", worst)
PY
