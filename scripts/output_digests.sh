#!/usr/bin/env bash
# Digests of everything the shipped specs write, timings removed: the zoo gate's outputs
# (experiments/ioi.toml and induction.toml on every fixture family, default.toml on SmolLM2),
# causal_tracing.toml on two families, and `tl-run plan` of every shipped spec (on gpt2-tiny; default.toml on
# its own SmolLM2). A refactor that must
# not change behaviour prints the same lines before and after (docs/architecture.md):
#   bash scripts/output_digests.sh BIN OUT > before.txt   (then the same after, and diff)
set -euo pipefail
bin="$(readlink -f "${1:?usage: output_digests.sh BIN OUT}")"
out="${2:?usage: output_digests.sh BIN OUT}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rm -rf "$out" && mkdir -p "$out"
# Job keys name the binary that computed them (graph/keys.rs engine_id); pinned, so that two
# builds' keys compare.
export TL_RUN_ENGINE_ID=output-digests
"$bin" check configs/zoo-ci.toml --quiet --out "$out/check" > "$out/check.txt" || true
# ROME's window of 10 layers is larger than the 2-layer fixtures: a window of 2 here.
sed 's/^window = 10/window = 2/' experiments/causal_tracing.toml > "$out/causal_tracing.toml"
for fam in gpt2-tiny gptj-tiny; do
  "$bin" run "$out/causal_tracing.toml" --quiet --model-id "$root/fixtures/$fam" --out "$out/ct-$fam" --fresh > /dev/null
done
for spec in experiments/*.toml; do
  model=(--model-id fixtures/gpt2-tiny)
  [ "$(basename "$spec")" = default.toml ] && model=()
  "$bin" plan "$spec" "${model[@]}" > "$out/plan-$(basename "$spec" .toml).txt" 2>&1 || true
done
cd "$out"
# Job seconds and any other timing are what may change; everything else must not.
find . -name 'manifest*.json' | sort | while read -r m; do
  printf '%s  %s\n' "$(jq -S 'del(.. | .seconds?, .timings_seconds?, .elapsed_seconds?)' "$m" | sha256sum | cut -c1-16)" "$m"
done
# The store's job files (.tl-run/jobs) carry their job's time in their metadata: not compared.
find . \( -name '*.parquet' -o -name 'plan-*.txt' \) -not -path '*/.tl-run/*' | sort | while read -r f; do
  printf '%s  %s\n' "$(sha256sum < "$f" | cut -c1-16)" "$f"
done
