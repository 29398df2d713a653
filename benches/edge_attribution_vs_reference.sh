#!/usr/bin/env bash
# Edge attribution on SmolLM2-135M (benches/edge_attribution_smollm2.toml: 64 IOI prompts, EAP,
# EAP-IG with 5 steps, the faithfulness of the top 10 .. 3000 EAP-IG edges) against the same work
# in Python the way the EAP-IG code does it (benches/ref_edge_attribution.py: TransformerLens 4.3
# hooks, activation differences in one tensor, einsums in backward hooks) on the same dequantized
# weights, same machine, same run. Prints both times, the ratio, tl-run's EAP job against one
# plain forward + backward (HF transformers, same batch), the peak memory of each, and how far
# the two agree (scores and faithfulness), so the speed is measured on equal results.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
hf_dir="$HOME/.cache/tl-run/bench-fixtures/smollm2-hf"
mkdir -p "$hf_dir"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TQDM_DISABLE=1
.venv/bin/python benches/tl_smollm2.py .models/SmolLM2-135M-Instruct.Q4_1.gguf "$hf_dir" 2>/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The committed prompts are what the generator writes (every prompt one token length).
.venv/bin/python benches/make_ioi64.py "$hf_dir/tokenizer.json" "$work/ioi64.jsonl"
cmp "$work/ioi64.jsonl" benches/ioi64.jsonl
ours=$(python3 -c "
import json, resource, subprocess, time
t = time.perf_counter()
subprocess.run(['target/release/tl-run', 'benches/edge_attribution_smollm2.toml', '--out', '$work/ours', '--quiet'], check=True, stdout=subprocess.DEVNULL)
print(json.dumps({'seconds': round(time.perf_counter() - t, 2), 'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2)}))")
ref=$(.venv/bin/python benches/ref_edge_attribution.py "$hf_dir" benches/ioi64.jsonl "$work/ref" 2>/dev/null | tail -1)
.venv/bin/python - "$work" "$ours" "$ref" <<'PY'
import json, sys
import pandas as pd
work, ours, ref = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
manifest = json.load(open(f"{work}/ours/manifest.json"))
jobs = {j["name"]: j["seconds"] for j in manifest["jobs"]}
eap_job = next(s for n, s in jobs.items() if n.startswith("eap: eap scores"))
theirs = json.load(open(f"{work}/ref/scores.json"))
for run, method in [("eap", "eap"), ("eap-ig", "eap_ig")]:
    t = pd.read_parquet(f"{work}/ours/{run}.parquet")
    mine = dict(zip(t["label"], t["value"]))
    assert set(mine) == set(theirs[method]), f"{run}: the edge sets differ"
    diff = max(abs(mine[k] - v) for k, v in theirs[method].items())
    signal = max(abs(v) for v in theirs[method].values())
    print(f"{method}: {len(mine)} edges, max |tl-run - reference| {diff:.2e}, signal (max |score|) {signal:.3f}")
    # The speed is only worth reporting on equal results.
    assert signal >= 20 * 5e-5 and diff <= 5e-5, f"{method}: scores differ ({diff:.2e}, signal {signal:.3f})"
for key, theirs_m in [("clean_baseline", ref["clean_metric"]), ("corrupted_baseline", ref["corrupted_metric"])]:
    assert abs(manifest["metric"][key] - theirs_m) < 1e-4, f"{key}: {manifest['metric'][key]} vs {theirs_m}"
mine_c = [c for c in manifest["runs"]["eap-ig"]["circuits"] if c["selection"] == "top_n"]
assert [c["requested"] for c in mine_c] == [c["top_n"] for c in ref["circuits"]], "the circuit sizes differ"
for a, b in zip(mine_c, ref["circuits"]):
    print(f"top {a['requested']:>4}: {a['edges']:>4} edges (reference {b['edges']:>4}), "
          f"faithfulness {a['faithfulness']:.4f} (reference {b['faithfulness']:.4f})")
    assert a["edges"] == b["edges"] and abs(a["faithfulness"] - b["faithfulness"]) < 1e-3, f"top {a['requested']} differs"
print(f"reference (Python, EAP-IG code's way): {ref['work_seconds']} s of work {ref['seconds']}, "
      f"peak RSS {ref['peak_rss_gb']} GB")
print(f"tl-run (whole command incl. load and writes): {ours['seconds']} s, peak RSS {ours['peak_rss_gb']} GB; "
      f"jobs: {json.dumps({n: round(s, 2) for n, s in jobs.items() if s > 0.1})}")
print(f"speed-up vs the reference: {ref['work_seconds'] / ours['seconds']:.1f}x (the reference's model load "
      "excluded; tl-run's whole command includes its load, writes, and the two ends of the faithfulness "
      "scale, which the reference takes from its clean and corrupted runs)")
print(f"tl-run's EAP job ({eap_job:.2f} s) / one forward + backward of HF transformers on the same batch "
      f"({ref['fwd_bwd_seconds']} s): {eap_job / ref['fwd_bwd_seconds']:.2f}x")
PY
