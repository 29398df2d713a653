#!/usr/bin/env bash
# benches/kinds.toml (attribution, logit lens + DLA, head scores, a mean-ablation sweep of every
# head) on the GPT-2-small-shaped fixture: tl-run against TransformerLens doing the same work as
# its demos do (benches/tl_kinds.py), same machine, same run. Prints seconds and ratios per kind.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
model="$(bench_model)"
out="$(mktemp -d)"
target/release/tl-run benches/kinds.toml --model-id "$model" --out "$out" --quiet > /dev/null
tl=$(HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore .venv/bin/python benches/tl_kinds.py "$model" 2>/dev/null | tail -1)
.venv/bin/python - "$out/manifest.json" "$tl" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["timings_seconds"]
tl = json.loads(sys.argv[2])
def run(name):
    """Seconds of the jobs of run `name` (the manifest times each job: "<run>: <what>")."""
    return sum(v for k, v in m.items() if k.startswith(name + ": "))
ours = {
    # Both sides include the clean and corrupted runs and the backward attribution needs (tl-run
    # keeps the corrupted run's graph for it).
    "attribution": m["clean and corrupted runs"] + m.get("corrupted run's backward", 0.0) + run("attribution") + run("attribution-heads"),
    # tl-run makes one clean forward that caches the hooks all of these read.
    "logit lens, DLA layers + heads, head scores": m.get("clean run (cache analysis hooks)", 0.0) + run("logit-lens") + run("dla-layers") + run("dla-heads") + run("head-scores"),
    "ablation sweep (every head)": run("ablation"),
}
tl["logit lens, DLA layers + heads, head scores"] = tl.pop("logit lens + DLA layers + DLA heads") + tl.pop("head scores")
print(f"{'kind':<46}{'TransformerLens':>16}{'tl-run':>10}{'ratio':>8}   (torch threads: {tl['torch_threads']})")
for k, v in ours.items():
    print(f"{k:<46}{tl[k]:>15.2f}s{v:>9.2f}s{tl[k] / v:>7.1f}x")
PY
rm -rf "$out"
