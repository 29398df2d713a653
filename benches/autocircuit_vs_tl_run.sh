#!/usr/bin/env bash
# tl-run's edge attribution (kind = "edge_attribution": method "eap", and "eap_ig" with 5 steps)
# against AutoCircuit 1.0.1 (PyPI auto-circuit) on the GPT-2 fixture fixtures/gpt2-tiny, three IOI
# prompts (corrupted prompt i = prompt (i+1) mod 3), logit difference at the last position.
# AutoCircuit runs in its own venv (~/.cache/tl-run/autocircuit-venv, made here if missing:
# auto-circuit==1.0.1 with transformer-lens<3, as transformer-lens 3 renamed
# HookedTransformerKeyValueCache and 4 removed HookedTransformer, both of which AutoCircuit
# imports) through benches/autocircuit_eap.py, which builds the HookedTransformer from the
# fixture's safetensors with TransformerLens's default weight processing (tl-run's default too),
# and renames AutoCircuit's edges to tl-run's.
#
# Compared, per method: the edges of each graph, max |diff| over the matched edges after the
# stated transform, the signal (max |score|), Pearson r, the top-20 edges by |score|.
#   EAP: AutoCircuit's mask gradient at mask 0 ("Edge Attribution Patching") and its slow
#     hook-based EAP; AutoCircuit differentiates the loss -logit_diff, so its score = -tl-run's.
#   IG: AutoCircuit's "Integrated Edge Gradients" (mask_gradient_prune_scores with
#     integrated_grad_samples = 5) is integrated gradients over the edge MASKS (all of them moved
#     together from 0 = clean to 1 = corrupt, k/5 for k = 0..5: 6 samples summed), not tl-run's EAP-IG over
#     the input embeddings (corrupted + k/5 (clean - corrupted), k = 0..4, averaged); compared as
#     -score/5, which agrees in ranking but not in size (the fit's slope is printed), plus
#     AutoCircuit's own completeness check (sum over edges = change of its loss clean -> corrupt).
#
# TL_RUN_BIN=/path/to/tl-run skips benches/lib.sh's setup and cargo build and uses that binary.
# AC_VENV=DIR puts AutoCircuit's venv elsewhere.
if [ -n "${TL_RUN_BIN:-}" ]; then
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$root"
  tl_run="$TL_RUN_BIN"
else
  source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
  tl_run=target/release/tl-run
fi
model="$(cd fixtures/gpt2-tiny && pwd -P)"
venv="${AC_VENV:-$HOME/.cache/tl-run/autocircuit-venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TQDM_DISABLE=1

if ! "$venv/bin/python" -c "import auto_circuit.utils.graph_utils" 2>/dev/null; then
  echo "autocircuit: creating $venv (auto-circuit 1.0.1, torch, transformer-lens 2.x; a few GB)" >&2
  rm -rf "$venv"
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # pyarrow<22: transformer-lens 2.x pins numpy<2, which newer pyarrow (datasets imports it) rejects.
  nice -n 19 "$venv/bin/pip" install -q "auto-circuit==1.0.1" "transformer-lens<3" "pyarrow<22"
fi
"$venv/bin/python" -c "import importlib.metadata as m; print('AutoCircuit venv: ' + ', '.join(p + ' ' + m.version(p) for p in ['auto-circuit', 'torch', 'transformer-lens', 'transformers']))"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
prompts = [
    ("When John and Mary went to the shops, John gave the bag to", " Mary", " John"),
    ("When Tom and James went to the park, James gave the ball to", " Tom", " James"),
    ("When John and Mary went to the shops, Mary gave the bag to", " John", " Mary"),
]
rows = [dict(clean=p, corrupt=prompts[(i + 1) % len(prompts)][0], answers=[c, w])
        for i, (p, c, w) in enumerate(prompts)]
with open(f"{work}/prompts.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
json.dump({"prompts": [dict(clean=r["clean"], corrupt=r["corrupt"], answers=[r["answers"][0]],
                            wrong_answers=[r["answers"][1]]) for r in rows]},
          open(f"{work}/prompts.json", "w"), indent=1)
PY
for prompts in prompts.jsonl prompts.json; do
  cat > "$work/spec-${prompts#*.}.toml" <<EOF
name = "ac"
[model]
id = "$model"
[prompts]
file = "$prompts"
[corruption]
kind = "prompts"
[metric]
kind = "logit_diff"
[[run]]
name = "eap"
kind = "edge_attribution"
method = "eap"
[[run]]
name = "eap-ig"
kind = "edge_attribution"
method = "eap_ig"
steps = 5
[output]
dir = "out"
EOF
done
# tl-run on the JSONL prompts, and again on AutoCircuit's JSON file (it reads that format too).
"$tl_run" "$work/spec-jsonl.toml" --out "$work/tl" --quiet > /dev/null
"$tl_run" "$work/spec-json.toml" --out "$work/tl-acjson" --quiet > /dev/null
nice -n 19 "$venv/bin/python" benches/autocircuit_eap.py "$model" "$work/prompts.json" "$work/ac.json" --ig-samples 5 2>/dev/null

.venv/bin/python - "$work" <<'PY'
import json, sys
import numpy as np
import pandas as pd

work = sys.argv[1]
ac = json.load(open(f"{work}/ac.json"))
meta = ac["meta"]
manifest = json.load(open(f"{work}/tl/manifest.json"))
ld_clean, ld_corr = manifest["metric"]["clean_baseline"], manifest["metric"]["corrupted_baseline"]

def tl(out, run):
    d = pd.read_parquet(f"{work}/{out}/{run}.parquet")
    return dict(zip(d["label"], d["value"].astype(float)))

def top(s, n=20):
    return [k for k, _ in sorted(s.items(), key=lambda kv: -abs(kv[1]))[:n]]

print(f"model {meta['n_prompts']} prompts x {meta['seq_len']} tokens (BOS first); "
      f"logit diff clean {ld_clean:.6f} (AutoCircuit {meta['clean_logit_diff']:.6f}), corrupted {ld_corr:.6f}")
for out, label in [("tl-acjson", "tl-run on AutoCircuit's JSON vs on the JSONL")]:
    for run in ["eap", "eap-ig"]:
        a, b = tl(out, run), tl("tl", run)
        assert a.keys() == b.keys()
        print(f"{label}, {run}: max |diff| {max(abs(a[k] - b[k]) for k in a):.3g}")

def compare(title, ac_scores, scale, ours):
    a = {k: v * scale for k, v in ac_scores.items()}
    only_ac, only_tl = sorted(set(a) - set(ours)), sorted(set(ours) - set(a))
    common = sorted(set(a) & set(ours))
    x = np.array([a[k] for k in common]); y = np.array([ours[k] for k in common])
    ta, tt = top({k: a[k] for k in common}), top({k: ours[k] for k in common})
    print(f"\n{title}")
    print(f"  edges: AutoCircuit {len(a)}, tl-run {len(ours)}, matched {len(common)}; "
          f"only AutoCircuit {only_ac or 'none'}, only tl-run {only_tl or 'none'}")
    print(f"  max |diff| {np.abs(x - y).max():.3g}; signal max |score| tl-run {np.abs(y).max():.4g}, "
          f"AutoCircuit (transformed) {np.abs(x).max():.4g}; signal / max |diff| {np.abs(y).max() / np.abs(x - y).max():.3g}")
    print(f"  Pearson r {np.corrcoef(x, y)[0, 1]:.9f}; least-squares slope AutoCircuit ~ slope * tl-run: "
          f"{(x * y).sum() / (y * y).sum():.4f}")
    print(f"  top 20 by |score|: {len(set(ta) & set(tt))}/20 in both, same order: {ta == tt}")
    if set(ta) != set(tt):
        print(f"    only AutoCircuit's: {sorted(set(ta) - set(tt))}; only tl-run's: {sorted(set(tt) - set(ta))}")
    assert not only_ac and not only_tl, "the graphs differ"
    return x, y

def assert_equal(title, x, y, tol=1e-5):
    diff, signal = np.abs(x - y).max(), np.abs(y).max()
    assert signal >= 20 * tol and diff <= tol, f"{title}: max |diff| {diff:.3g}, signal {signal:.3g}"

assert abs(meta["clean_logit_diff"] - ld_clean) < 1e-5, "the clean logit differences differ (BOS, tokens?)"

eap, eap_ig = tl("tl", "eap"), tl("tl", "eap-ig")
assert_equal("EAP (mask gradient)", *compare(
    "EAP: AutoCircuit mask_gradient_prune_scores(grad_function='logit', answer_function='avg_diff', "
    "mask_val=0) [its 'Edge Attribution Patching'] x (-1)  vs  tl-run method = \"eap\"", ac["eap"], -1.0, eap))
assert_equal("EAP (hook-based)", *compare(
    "EAP: AutoCircuit edge_attribution_patching_prune_scores (hook-based) x (-1)  vs  tl-run \"eap\"",
    ac["eap_slow"], -1.0, eap))
m = meta["ig_samples"]
compare(f"IG: AutoCircuit mask_gradient_prune_scores(integrated_grad_samples={m}) [its 'Integrated Edge "
        f"Gradients'] x (-1/{m})  vs  tl-run method = \"eap_ig\", steps = {m} (different definitions)",
        ac["ieg"], -1.0 / m, eap_ig)
print(f"  AutoCircuit IEG completeness: sum over edges / {m} = {sum(ac['ieg'].values()) / m:.4f} vs its loss "
      f"change clean -> corrupt (-logit diff) {ld_clean - ld_corr:.4f} ({m + 1} samples, k = 0..{m}, both ends)")
PY
