#!/usr/bin/env bash
# Builds the fixture models and the TransformerLens outputs the tests compare against, under
# ~/.cache/tl-run, and links them as fixtures/ (models) and fixtures/oracle/<fixture>/ (one file
# per oracle output). Each part is keyed by a hash of what makes it: the models by
# make_fixtures.py and configs/fixtures.toml, each tests/oracle/dump_*.py output by that script,
# the oracle modules it imports (scripts/oracle_deps.sh), the prompts and the models. A fresh
# clone (CI) reuses them; changing one oracle script rebuilds only its outputs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$root/.venv/bin/python"
cache="${TL_RUN_CACHE:-$HOME/.cache/tl-run}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONWARNINGS=ignore
hash() { cat "$@" | sha256sum | cut -c1-16; }

# build DIR CMD...: runs CMD (with @OUT@ replaced by DIR.tmp) unless DIR is complete, then renames
# DIR.tmp to DIR, so an interrupted build is never taken for a finished one.
build() {
  local dir="$1"; shift
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    local args=()
    for a in "$@"; do args+=("${a//@OUT@/$dir.tmp}"); done
    "${args[@]}"
    touch "$dir.tmp/.complete"
    mv "$dir.tmp" "$dir"
  fi
}

# Every file of stories260K counts (its config and tokenizer shape the fixtures and oracles too).
models_stamp="$(hash tests/oracle/make_fixtures.py configs/fixtures.toml scripts/requirements.txt tests/models/stories260K/*)"
models="$cache/fixture-models-$models_stamp"
if [ ! -f "$models/.complete" ]; then echo "tl-run: building fixture models" >&2; fi
build "$models" "$py" tests/oracle/make_fixtures.py @OUT@ .gpt2-bpe tests/models/stories260K

rm -rf fixtures.tmp
mkdir -p fixtures.tmp/oracle
for m in "$models"/*/; do ln -s "${m%/}" "fixtures.tmp/$(basename "$m")"; done
for script in tests/oracle/dump_*.py; do
  name="$(basename "$script" .py)"
  # The script, every oracle module it imports (transitively), the prompts and the models.
  deps="$(bash scripts/oracle_deps.sh "$script")"
  stamp="$( { cat $deps experiments/prompts/*.jsonl; echo "$models_stamp"; } | sha256sum | cut -c1-16)"
  out="$cache/oracle-$name-$stamp"
  if [ ! -f "$out/.complete" ]; then echo "tl-run: running TransformerLens for $name (a few minutes)" >&2; fi
  build "$out" "$py" "$script" "$models" @OUT@
  for f in "$out"/*/*; do
    fixture="$(basename "$(dirname "$f")")"
    mkdir -p "fixtures.tmp/oracle/$fixture"
    ln -s "$f" "fixtures.tmp/oracle/$fixture/$(basename "$f")"
  done
done
rm -rf fixtures
mv fixtures.tmp fixtures

# Logits references for `tl-run check configs/zoo-ci.toml`, made by HF transformers
# (scripts/reference_logits.py) from the fixtures, stories260K and the default SmolLM2 model.
smollm2="$(readlink -f .models/SmolLM2-135M-Instruct.Q4_1.gguf)"
refs_stamp="$( { cat scripts/reference_logits.py configs/zoo-ci.toml scripts/requirements.txt; echo "$models_stamp $smollm2"; } | sha256sum | cut -c1-16)"
refs="$cache/references-$refs_stamp"
if [ ! -f "$refs/.complete" ]; then echo "tl-run: making reference logits for configs/zoo-ci.toml with transformers" >&2; fi
build "$refs" "$py" scripts/reference_logits.py --zoo configs/zoo-ci.toml --out-dir @OUT@
ln -sfn "$refs" fixtures/references
