#!/usr/bin/env bash
# How well attribution patching predicts activation patching: for each target, the Pearson and
# Spearman correlation over all cells between tl-run's AtP (plain, AtP* qk fix, GradDrop) and its
# activation patching (equal to patching.py, tests/), on the IOI prompts of the GPT-2 fixtures
# and the stories prompts of the real stories260K. Prints one table per model.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
spec="$(mktemp -d)/atp.toml"
{
  printf 'name = "atp-vs-patching"\n[model]\nid = "gpt2"\n[prompts]\nfile = "%s"\n' "$root/experiments/prompts/ioi.jsonl"
  printf '[corruption]\nkind = "swap_pairs"\n[metric]\nkind = "logit_diff"\nnormalize = true\n'
  for over in '["layer", "pos"]|["resid_pre", "attn_out", "mlp_out"]' '["layer", "head"]|["z", "q", "k", "v", "pattern"]' '["layer", "pos", "head"]|["z", "q", "k", "v"]'; do
    axes="${over%%|*}"; hooks="${over##*|}"; tag="$(echo "$axes" | tr -dc 'a-z')"
    printf '[[run]]\nname = "patch-%s"\nkind = "activation_patching"\nhooks = %s\nover = %s\n' "$tag" "$hooks" "$axes"
    printf '[[run]]\nname = "atp-%s"\nkind = "attribution_patching"\nhooks = %s\nover = %s\n' "$tag" "$hooks" "$axes"
    printf '[[run]]\nname = "atpstar-%s"\nkind = "attribution_patching"\nhooks = %s\nover = %s\nqk_fix = true\n' "$tag" "$hooks" "$axes"
    printf '[[run]]\nname = "graddrop-%s"\nkind = "attribution_patching"\nhooks = %s\nover = %s\ngrad_drop = true\n' "$tag" "$hooks" "$axes"
  done
} > "$spec"
for model in gpt2-tiny gpt2-odd stories260K; do
  dir="fixtures/$model"; prompts=()
  if [ "$model" = stories260K ]; then dir="tests/models/stories260K"; prompts=(--prompts experiments/prompts/stories.jsonl); fi
  out="$(mktemp -d)"
  target/release/tl-run "$spec" --model-id "$dir" --out "$out" --quiet "${prompts[@]}" > /dev/null
  .venv/bin/python - "$out" "$model" <<'PY'
import sys, glob, os
import pandas as pd
out, model = sys.argv[1], sys.argv[2]
def load(prefix):
    frames = [pd.read_parquet(f) for f in sorted(glob.glob(f"{out}/{prefix}-*.parquet"))]
    df = pd.concat(frames)
    df = df[df["prompt"].isna()].drop(columns=["patched"]).copy()
    df["over"] = [p.split("-")[1] for p in df["run"]]
    return df
def corr(a, b):
    # Pearson r, and Spearman rho as the Pearson r of average ranks (no scipy needed).
    return a.corr(b), a.rank().corr(b.rank())
keys = ["over", "hook", "layer", "head", "pos", "dest_pos", "src_pos"]
patch = load("patch").rename(columns={"value": "patched"})[keys + ["patched"]]
print(f"\n{model}: correlation over all cells of each target (normalised metric)")
print(f"{'target':<28}{'cells':>6}  {'AtP r':>7} {'rho':>6}  {'AtP* r':>7} {'rho':>6}  {'|GD| vs |patch| r':>17} {'rho':>6}")
merged = {}
for name in ["atp", "atpstar", "graddrop"]:
    m = load(name).merge(patch, on=keys, how="inner")
    m["target"] = m["hook"].str.replace(r"blocks\.\d+\.", "", regex=True) + " [" + m["over"] + "]"
    merged[name] = m
for target, g in merged["atp"].groupby("target", sort=False):
    row = [f"{target:<28}{len(g):>6}"]
    for name in ["atp", "atpstar", "graddrop"]:
        h = merged[name][merged[name]["target"] == target]
        a, b = (h["value"], h["patched"]) if name != "graddrop" else (h["value"].abs(), h["patched"].abs())
        r, rho = corr(a, b)
        row.append(f"{r:>7.3f} {rho:>6.3f}" if name != "graddrop" else f"{r:>17.3f} {rho:>6.3f}")
    print("  ".join(row))
PY
  rm -rf "$out"
done
