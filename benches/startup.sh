#!/usr/bin/env bash
# Start-up and overhead on the GPT-2-small-shaped fixture (498 MB of f32 safetensors, page cache
# warm), each measured three times in this run:
#   floor     `tl-run --version`: process start, i.e. libtorch's static initialisers;
#   hooks     `tl-run hooks MODEL`: start, config, the checkpoint mapped and checked against it;
#   cache     `tl-run cache MODEL` of one prompt and one hook: start, config, tokenizer, weights
#             read, converted and processed, one forward, one write (a full start-up);
#   load      that load's own read+convert and process times (its -vv log) and GB/s of the file;
#   overhead  experiments/ioi.toml whole command minus the work its manifest times (clean and
#             corrupted runs, every run's jobs), as a share of that work: loading, hashing,
#             planning, Parquet and manifest writes, exit.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
model="$(bench_model)"
bin=target/release/tl-run
bytes=$(stat -c %s "$model/model.safetensors")
cat "$model/model.safetensors" > /dev/null
wall() { python3 -c "
import subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f'{time.perf_counter() - t:.3f}')" "$@"; }
acts="$(mktemp -d)/acts.safetensors"
cache=($bin cache "$model" --prompt "When Mary and John went to the store, John gave a drink to" --hooks blocks.0.hook_resid_pre --out "$acts")
for i in 1 2 3; do
  floor=$(wall $bin --version)
  hooks=$(wall $bin hooks "$model")
  full=$(wall "${cache[@]}")
  log=$("${cache[@]}" -vv 2>&1 >/dev/null | sed 's/\x1b\[[0-9;]*m//g')
  read_s=$(echo "$log" | grep -o 'converted to the TransformerLens layout seconds=[0-9.]*' | cut -d= -f2)
  proc_s=$(echo "$log" | grep -o 'processed and placed seconds=[0-9.]*' | cut -d= -f2)
  python3 -c "print(f'run $i: floor {$floor:.2f} s, hooks {$hooks:.2f} s, cache {$full:.2f} s, load {$read_s + $proc_s:.2f} s (read+convert {$read_s:.2f}, process {$proc_s:.2f}) = {$bytes / ($read_s + $proc_s) / 1e9:.2f} GB/s')"
done
out="$(mktemp -d)"
for i in 1 2; do
  whole=$(wall $bin experiments/ioi.toml --model-id "$model" --out "$out" --quiet --fresh)
  python3 - "$out/manifest.json" "$whole" "$i" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["timings_seconds"]
whole, i = float(sys.argv[2]), sys.argv[3]
# Work: what TransformerLens would also do. Everything else (load, hashing, plan, writes) is overhead.
work = sum(v for k, v in t.items() if not k.startswith(("load model", "tokenize")))
load = sum(v for k, v in t.items() if k.startswith("load model"))
print(f"ioi.toml run {i}: whole {whole:.2f} s, work {work:.2f} s, overhead {whole - work:.2f} s "
      f"({(whole - work) / work * 100:.1f}% of the work; the load step {load:.2f} s of it)")
EOF
done
rm -rf "$out" "$(dirname "$acts")"
