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
ours = {
    # Both sides include the clean and corrupted runs the attribution needs.
    "attribution": m["clean and corrupted runs"] + m["attribution (total)"] + m["attribution-heads (total)"],
    # tl-run makes one clean forward for all of these (in whichever run comes first).
    "logit lens, DLA layers + heads, head scores": m["logit-lens (total)"] + m["dla-layers (total)"] + m["dla-heads (total)"] + m["head-scores (total)"],
    "ablation sweep (every head)": m["ablation (total)"],
}
tl["logit lens, DLA layers + heads, head scores"] = tl.pop("logit lens + DLA layers + DLA heads") + tl.pop("head scores")
print(f"{'kind':<46}{'TransformerLens':>16}{'tl-run':>10}{'ratio':>8}   (torch threads: {tl['torch_threads']})")
for k, v in ours.items():
    print(f"{k:<46}{tl[k]:>15.2f}s{v:>9.2f}s{tl[k] / v:>7.1f}x")
PY
rm -rf "$out"
